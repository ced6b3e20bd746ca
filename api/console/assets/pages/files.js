// The team's datasets: upload (every line is checked first: each bad line's number and reason are shown) and
// the uploaded files with their format, samples and sha256.

import { ApiError, SignedOut, api } from "../api.js";
import { ago, bytes, clear, errorBox, h, num } from "../dom.js";

export function render(root) {
  const input = h("input", { type: "file", id: "file-input", accept: ".jsonl,.json,.parquet,.csv,application/jsonl,text/csv", required: true });
  const result = h("div", { id: "upload-result", role: "status" });
  const list = h("div", { id: "files-list" });
  const form = h(
    "form",
    { id: "upload-form", class: "toolbar" },
    h("label", { for: "file-input" }, "JSONL dataset"),
    input,
    h("button", { type: "submit", class: "primary" }, "Upload"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!input.files.length) return;
    const data = new FormData();
    data.append("file", input.files[0]);
    data.append("purpose", "fine-tune");
    clear(result, h("p", { class: "muted" }, `Checking ${input.files[0].name} line by line…`));
    try {
      const file = await api.upload("/v1/files", data);
      clear(
        result,
        h(
          "p",
          { class: "success" },
          `Uploaded ${file.filename} as `,
          h("span", { class: "mono" }, file.id),
          `: ${num(file.num_samples)} samples (${file.format}), sha256 ${file.sha256}.`,
        ),
      );
      form.reset();
      load();
    } catch (error) {
      if (error instanceof SignedOut) return;
      const lines = error instanceof ApiError ? error.details.filter((d) => d.line || d.row) : [];
      clear(
        result,
        errorBox(error),
        lines.length
          ? h(
              "table",
              { class: "grid bad-lines", id: "bad-lines" },
              h("thead", {}, h("tr", {}, h("th", {}, lines.some((d) => d.row) ? "Row" : "Line"), h("th", {}, "Why it cannot be trained on"))),
              h("tbody", {}, lines.map((d) => h("tr", {}, h("td", { class: "mono" }, d.line || d.row), h("td", {}, d.message)))),
            )
          : null,
      );
    }
  });

  async function load() {
    try {
      const files = await api.get("/v1/files");
      clear(
        list,
        files.data.length
          ? h(
              "table",
              { class: "grid", id: "files-table" },
              h("thead", {}, h("tr", {}, ["File", "Name", "Format", "Samples", "Size", "sha256", "Uploaded", ""].map((t) => h("th", {}, t)))),
              h(
                "tbody",
                {},
                files.data.map((f) =>
                  h(
                    "tr",
                    { dataset: { file: f.id } },
                    h("td", { class: "mono" }, f.id),
                    h("td", {}, f.filename),
                    h("td", {}, f.format),
                    h("td", {}, num(f.num_samples)),
                    h("td", { class: "nowrap" }, bytes(f.bytes)),
                    h("td", { class: "mono sha", title: f.sha256 }, f.sha256),
                    h("td", {}, ago(new Date(f.created_at * 1000).toISOString())),
                    h("td", {}, h("a", { href: `#/new?dataset=${f.id}` }, "Train on it")),
                  ),
                ),
              ),
            )
          : h("p", { class: "muted" }, "No files yet."),
      );
    } catch (error) {
      if (!(error instanceof SignedOut)) clear(list, errorBox(error));
    }
  }

  root.append(
    h(
      "section",
      { class: "card" },
      h("h1", {}, "Files"),
      h(
        "p",
        { class: "muted" },
        "JSONL (one sample a line), Parquet or CSV, with messages, prompt/completion or text: every line or row is checked before the file is stored.",
      ),
      form,
      result,
    ),
    h("section", { class: "card" }, h("h2", {}, "Uploaded"), list),
  );
  load();
}

// Small DOM and formatting helpers. Text always goes in as text nodes (never as HTML), and no element gets a
// style attribute (the page's Content-Security-Policy allows neither inline script nor inline style).

export function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name === "value" && "value" in element) element.value = value;
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

export function clear(element, ...children) {
  element.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function ago(iso) {
  if (!iso) return "—";
  const seconds = (Date.now() - new Date(iso).getTime()) / 1000;
  return seconds < 5 ? "just now" : `${duration(seconds)} ago`;
}

export function num(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString();
  return Number(value.toPrecision(digits)).toString();
}

export function badge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// "12 / 40 steps" and the time left, from a job's answer.
export function progressOf(job) {
  const p = job.progress;
  if (p) {
    const left = p.estimated_finish ? (new Date(p.estimated_finish).getTime() - Date.now()) / 1000 : null;
    return { step: p.step, total: p.total_steps, fraction: p.fraction, eta: left };
  }
  if (job.status === "succeeded" && job.result && job.result.steps) {
    return { step: job.result.steps, total: job.result.steps, fraction: 1, eta: null };
  }
  return null;
}

export function progressCell(job) {
  const p = progressOf(job);
  if (!p) return h("span", { class: "muted" }, "—");
  return h(
    "span",
    { class: "progress" },
    h("progress", { max: 1, value: p.fraction ?? 0 }),
    h("span", { class: "muted" }, p.total ? `${p.step} / ${p.total}` : `step ${p.step}`),
  );
}

export function etaText(job) {
  const p = progressOf(job);
  if (!p || TERMINAL.has(job.status) || p.eta === null) return "—";
  return p.eta <= 0 ? "any moment" : `~${duration(p.eta)}`;
}

export function queueText(job) {
  if (!job.queue) return "—";
  const gpus = `${job.queue.gpus} GPU${job.queue.gpus === 1 ? "" : "s"}`;
  return `#${job.queue.position} · waits for ${gpus}`;
}

// A spec or answer flattened to "section.name" keys (for side-by-side tables).
export function flatten(value, prefix = "", into = {}) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix}.${key}` : key, into);
  } else if (value !== null && value !== undefined) {
    into[prefix] = Array.isArray(value) ? JSON.stringify(value) : value;
  }
  return into;
}

export function notFound(root, what) {
  clear(
    root,
    h(
      "section",
      { class: "card not-found" },
      h("h1", {}, "404 · Not found"),
      h("p", {}, what || "There is nothing here, or it belongs to another team."),
      h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")),
    ),
  );
}

export function errorBox(error) {
  const box = h("div", { class: "error-box", role: "alert" }, h("strong", {}, error.message));
  if (error.param) box.append(h("div", { class: "muted" }, `field: ${error.param}`));
  return box;
}

// Sign-in: the team's API key is checked against the API, then kept in this tab's sessionStorage only.

import { request, session } from "../api.js";
import { h } from "../dom.js";

export function render(root) {
  const input = h("input", {
    type: "password",
    id: "api-key",
    name: "api-key",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    placeholder: "tf-…",
  });
  const error = h("p", { class: "error", role: "alert" });
  const reason = session.reason();
  const form = h(
    "form",
    { class: "card narrow", id: "sign-in" },
    h("h1", {}, "Sign in"),
    reason ? h("p", { class: "notice", id: "sign-in-reason" }, reason) : null,
    h("label", { for: "api-key" }, "Your team's API key"),
    input,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    error,
    h(
      "p",
      { class: "muted small" },
      "The key stays in this browser tab (sessionStorage) and is sent only as the Authorization header of the " +
        "console's own requests: never in a URL.",
    ),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const key = input.value.trim();
    try {
      await request("GET", "/v1/jobs?limit=1", { key });
    } catch (failure) {
      error.textContent =
        failure.status === 401
          ? "That key was not accepted: it is unknown, revoked or expired."
          : `Could not sign in: ${failure.message}`;
      return;
    }
    input.value = "";
    session.signIn(key);
    location.hash = "#/jobs";
  });
  root.append(form);
  input.focus();
}

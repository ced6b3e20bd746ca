// The console's requests to the Tuneforge API. The API key lives in this tab's sessionStorage only and goes out
// as the Authorization header; it is never put in a URL. A 401 (a revoked or expired key) signs out.

const KEY = "tuneforge.apiKey";
const REASON = "tuneforge.signInReason";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the API answered ${status}`);
    this.status = status;
    this.code = error.code;
    this.param = error.param;
    this.details = (body && body.details) || [];
    this.body = body;
  }
}

export class SignedOut extends Error {}

export const session = {
  key: () => sessionStorage.getItem(KEY),
  reason: () => sessionStorage.getItem(REASON),
  signIn(key) {
    sessionStorage.setItem(KEY, key);
    sessionStorage.removeItem(REASON);
  },
  signOut(reason) {
    sessionStorage.removeItem(KEY);
    if (reason) sessionStorage.setItem(REASON, reason);
    else sessionStorage.removeItem(REASON);
  },
};

function signedOut() {
  session.signOut("Your API key was revoked or has expired. Sign in again.");
  location.hash = "#/signin";
  return new SignedOut("signed out");
}

// One request; throws ApiError for an error answer (SignedOut for a 401 with the session's key).
export async function request(method, path, { json, form, key, signal } = {}) {
  const headers = { Authorization: `Bearer ${key ?? session.key() ?? ""}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  const response = await fetch(path, { method, headers, body, signal, cache: "no-cache" });
  if (response.ok) return response;
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.status === 401 && key === undefined) throw signedOut();
  throw new ApiError(response.status, data);
}

export const api = {
  async get(path, options) {
    return (await request("GET", path, options)).json();
  },
  async post(path, json, options) {
    const response = await request("POST", path, { ...options, json });
    return { status: response.status, body: await response.json(), headers: response.headers };
  },
  async upload(path, form) {
    return (await request("POST", path, { form })).json();
  },
};

// Server-sent events read through fetch (EventSource cannot send the Authorization header): calls
// onEvent(type, data) for each, until the stream ends or `signal` aborts it.
export async function streamEvents(path, onEvent, signal) {
  const response = await request("GET", path, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) type = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(type, JSON.parse(data));
    }
  }
}

async function sha256Hex(blob) {
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

// Downloads an API file with the session's key and hands it to the browser as `filename`. With `sha256`, the
// bytes are checked in the browser first (where Web Crypto is available: HTTPS or localhost).
export async function download(path, filename, sha256) {
  // Streamed by the API (redirect=false), not redirected to storage: a presigned URL is another origin, which
  // the page could read only with CORS set up on the bucket.
  const response = await request("GET", path + (path.includes("?") ? "&" : "?") + "redirect=false");
  const blob = await response.blob();
  let verified = null;
  const expected = sha256 || response.headers.get("X-Checksum-Sha256");
  if (expected && globalThis.crypto && crypto.subtle && blob.size <= 2 ** 30) {
    verified = (await sha256Hex(blob)) === expected;
  }
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return { size: blob.size, verified };
}

// Talking to the API: the key, JSON calls, uploads with progress, authenticated images and the SSE stream.
// EventSource cannot send an Authorization header, so job events are read with fetch() and a stream reader.

const KEY = "tuneserve.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super(body.detail || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || String(status);
  }
}

export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set: (value) => (value ? localStorage.setItem(KEY, value) : localStorage.removeItem(KEY)),
};

let askForKey = async () => false;
export function onKeyNeeded(handler) { askForKey = handler; }

function headers(extra = {}) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(response) {
  let body = {};
  try { body = await response.json(); } catch { body = { detail: response.statusText }; }
  return new ApiError(response.status, body);
}

// A JSON call; on 401 the page asks for a key once and retries.
export async function api(path, { method = "GET", json, form, retry = true } = {}) {
  const init = { method, headers: headers(json ? { "Content-Type": "application/json" } : {}) };
  if (json !== undefined) init.body = JSON.stringify(json);
  if (form) init.body = form;
  const response = await fetch(path, init);
  if (response.status === 401 && retry && (await askForKey())) return api(path, { method, json, form, retry: false });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

// fetch() reports no upload progress; XMLHttpRequest does and can still send the Authorization header.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(headers())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch { body = { detail: xhr.statusText }; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.onerror = () => reject(new ApiError(0, { detail: "the upload was interrupted", code: "network" }));
    xhr.send(form);
  });
}

// An image behind the key, as an object URL an <img> can show.
export async function imageUrl(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return URL.createObjectURL(await response.blob());
}

// Reads GET /v1/jobs/{id}/events until the server ends it; reconnects with Last-Event-ID if the connection drops.
export function followJob(jobId, onEvent) {
  const controller = new AbortController();
  let lastId = null;
  let finished = false;

  async function once() {
    const response = await fetch(`/v1/jobs/${jobId}/events`, {
      headers: headers(lastId === null ? {} : { "Last-Event-ID": lastId }), signal: controller.signal,
    });
    if (!response.ok) throw await failure(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = { name: "message", data: "" };
        for (const line of frame.split("\n")) {
          if (line.startsWith("id:")) lastId = line.slice(3).trim();
          else if (line.startsWith("event:")) event.name = line.slice(6).trim();
          else if (line.startsWith("data:")) event.data += line.slice(5).trim();
        }
        if (!event.data) continue;
        if (event.name === "end") finished = true;
        onEvent(event.name, JSON.parse(event.data));
      }
    }
  }

  (async () => {
    while (!finished && !controller.signal.aborted) {
      try {
        await once();
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof ApiError) { onEvent("error", { detail: error.message }); return; }
      }
      if (!finished && !controller.signal.aborted) await new Promise((r) => setTimeout(r, 2000));
    }
  })();
  return () => controller.abort();
}

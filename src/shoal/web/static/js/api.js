// The JSON API, called with the API token pasted at login. The token is kept in this tab's
// sessionStorage and sent as `Authorization: Bearer`: no cookie, so no other site's page can
// make a call with it. A 401 (a token revoked or expired) sends back to the login page.

const TOKEN = "shoal.token";
const NEXT = "shoal.next"; // where to go back to after logging in again

export const token = () => sessionStorage.getItem(TOKEN);

export function signIn(value) {
  sessionStorage.setItem(TOKEN, value);
}

export function signOut(next = "") {
  sessionStorage.removeItem(TOKEN);
  if (next && !next.startsWith("#/login")) sessionStorage.setItem(NEXT, next);
  location.hash = "#/login";
}

export function afterLogin() {
  const next = sessionStorage.getItem(NEXT) || "#/nodes";
  sessionStorage.removeItem(NEXT);
  return next;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function headers(extra = {}, bearer = token()) {
  return { Authorization: `Bearer ${bearer}`, ...extra };
}

// Throws an ApiError with the master's own message (`{"error": ...}`) for any answer but 2xx.
export async function check(response) {
  if (response.ok) return response;
  if (response.status === 401) signOut(location.hash);
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error || message;
  } catch {
    // not a JSON body: the status says it
  }
  throw new ApiError(response.status, message);
}

export async function call(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  return check(await fetch(path, init));
}

export const get = async (path, options) => (await call(path, options)).json();

export const post = async (path, body, options) => (await call(path, { ...options, method: "POST", body })).json();

// Log in: paste an API token (`shoal token create NAME`, or the one `shoal dev` prints). It
// is checked with GET /v1/whoami and kept in this tab only (sessionStorage).
import { afterLogin, headers, signIn } from "../api.js";
import { $ } from "../dom.js";

export async function mount(main) {
  main.innerHTML = `
    <form id="login" class="login" autocomplete="off">
      <h1>shoal</h1>
      <label for="token">API token</label>
      <input id="token" name="token" type="password" spellcheck="false" required autofocus>
      <p class="hint">An API token from <code>shoal token create NAME</code> (or the admin token
      <code>shoal dev</code> prints). It stays in this tab only, until you log out or close it.</p>
      <button type="submit">Log in</button>
      <p id="error" class="error" role="alert"></p>
    </form>`;
  $("#login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("#token").value.trim();
    const error = $("#error");
    error.textContent = "";
    try {
      const response = await fetch("/v1/whoami", { headers: headers({}, value) });
      if (response.status === 401) {
        error.textContent = "The master does not take this token (mistyped, expired or revoked).";
        return;
      }
      if (!response.ok) {
        error.textContent = `The master answered ${response.status}; try again.`;
        return;
      }
      signIn(value);
      location.hash = afterLogin();
    } catch {
      error.textContent = "The master did not answer.";
    }
  });
}

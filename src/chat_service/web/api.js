// The REST side: /api/v1 calls with the login session, refreshed on 401.
//
// The session (access and refresh token) lives in sessionStorage, not localStorage: it belongs
// to this tab (two tabs can be two users, handy for a demo), it survives a reload, and it is
// gone when the tab closes, so a refresh token (valid for weeks) does not linger on a shared
// machine. Any script on this origin can still read it, which is why the page never inserts
// user text as HTML and ships a strict Content-Security-Policy. (An HttpOnly cookie would hide
// it from scripts, but this API takes bearer tokens only.)

const KEY = "chat.session";

export class ApiError extends Error {
  constructor(status, body) {
    const field = body?.errors?.[0];
    super(field ? `${field.loc.at(-1)}: ${field.msg}` : (body?.detail ?? `HTTP ${status}`));
    this.status = status;
    this.code = body?.code;
  }
}

export class Api {
  constructor(base = "/api/v1") {
    this.base = base;
    this.session = JSON.parse(sessionStorage.getItem(KEY) ?? "null");
    this.refreshing = null;
    this.onLogout = () => {};  // the session ended (refresh refused): log in again
  }

  get user() { return this.session?.user ?? null; }
  token() { return this.session?.access_token; }

  save({ access_token, refresh_token, user }) {
    this.session = { access_token, refresh_token, user };
    sessionStorage.setItem(KEY, JSON.stringify(this.session));
  }

  clear() {
    this.session = null;
    sessionStorage.removeItem(KEY);
  }

  async call(method, path, body, { auth = true, retry = true } = {}) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (auth && this.session) headers.Authorization = `Bearer ${this.session.access_token}`;
    const response = await fetch(this.base + path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && auth && retry && this.session) {
      await this.refresh();
      return this.call(method, path, body, { auth, retry: false });
    }
    const data = response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  async signup(username, password) {
    this.save(await this.call("POST", "/auth/signup", { username, password }, { auth: false }));
  }

  async login(username, password) {
    this.save(await this.call("POST", "/auth/login", { username, password }, { auth: false }));
  }

  // One refresh at a time: a refresh token works once, and presenting a spent one again
  // revokes the whole session, so concurrent callers share the same request.
  refresh() {
    this.refreshing ??= this.#refresh().finally(() => { this.refreshing = null; });
    return this.refreshing;
  }

  async #refresh() {
    const refresh_token = this.session?.refresh_token;
    try {
      if (!refresh_token) throw new ApiError(401, { detail: "Not logged in" });
      this.save(await this.call("POST", "/auth/refresh", { refresh_token }, { auth: false }));
    } catch (error) {
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        this.clear();
        this.onLogout();
      }
      throw error;  // a network error keeps the session: the caller retries later
    }
  }

  async logout() {
    const refresh_token = this.session?.refresh_token;
    try {
      if (refresh_token) await this.call("POST", "/auth/logout", { refresh_token });
    } finally {
      this.clear();
    }
  }
}

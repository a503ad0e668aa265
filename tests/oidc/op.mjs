// A real OpenID Provider for Warren's black-box tests: panva/oidc-provider 9 on Node.js.
// Adapted from shared/lab/oidc/op.mjs. Keys, sessions and grants live in memory only.
//
// Environment:
//   OP_PORT                    port on 127.0.0.1 (required); the issuer is http://127.0.0.1:OP_PORT
//   OP_ISSUER                  issuer override (optional)
//   CLIENT_ID / CLIENT_SECRET  the confidential web client (default warren / warren-secret),
//                              authenticating with client_secret_basic (CLIENT_AUTH_METHOD overrides)
//   REDIRECT_URIS              its redirect URIs, comma-separated (required)
//   POST_LOGOUT_REDIRECT_URIS  its post-logout redirect URIs, comma-separated (optional)
//   CLI_REDIRECT_URIS          redirect URIs of the public `cli` client (default http://127.0.0.1/cb;
//                              a native client, so any port of a loopback URI is accepted)
//   OP_ACCESS_TTL              lifetime of access and ID tokens in seconds (default 600)
//
// Users: alice/alice-pw (alice@example.test, groups admins+dev), bob/bob-pw (bob@example.test,
// groups dev), carol/carol-pw (carol@corp.test, no groups), mallory/mallory-pw (claims
// dave@example.test with email_verified false, groups admins). Every other user's e-mail is verified.
//
// Behaviour worth knowing:
//   - PKCE (S256) is required for every client; the `cli` client (public) also has the device flow
//     (its device authorization response has no `interval`: clients default to 5 s).
//   - Refresh tokens: an authorization request whose scope has `offline_access` gets
//     `prompt=consent` added (oidc-provider drops offline_access without it), and consent is
//     approved automatically, so the token response carries a refresh token.
//   - The login form is #username, #password, #login; wrong credentials answer 401 with the form.
//   - RP-initiated logout confirms itself (the confirmation page submits itself with JavaScript).
//   - Test control: `POST /test/disable/<user>` makes the account unknown (logins fail, refreshes
//     answer invalid_grant, existing IdP sessions no longer count); `POST /test/enable/<user>` undoes it.
//   - Prints `oidc-provider listening on <issuer>` once it accepts connections.
import http from 'node:http';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const env = (name, fallback) => {
  const v = process.env[name];
  if (v !== undefined && v !== '') return v;
  if (fallback === undefined) {
    console.error(`op.mjs: ${name} is required`);
    process.exit(2);
  }
  return fallback;
};
const list = (s) => s.split(',').map((x) => x.trim()).filter(Boolean);

const OP_PORT = Number(env('OP_PORT'));
const ISSUER = env('OP_ISSUER', `http://127.0.0.1:${OP_PORT}`);
const CLIENT_ID = env('CLIENT_ID', 'warren');
const CLIENT_SECRET = env('CLIENT_SECRET', 'warren-secret');
const CLIENT_AUTH_METHOD = env('CLIENT_AUTH_METHOD', 'client_secret_basic');
const REDIRECT_URIS = list(env('REDIRECT_URIS'));
const POST_LOGOUT_REDIRECT_URIS = list(env('POST_LOGOUT_REDIRECT_URIS', ''));
const CLI_REDIRECT_URIS = list(env('CLI_REDIRECT_URIS', 'http://127.0.0.1/cb'));
const ACCESS_TTL = Number(env('OP_ACCESS_TTL', '600'));
if (!Number.isInteger(OP_PORT) || OP_PORT <= 0 || !(ACCESS_TTL > 0)) {
  console.error('op.mjs: OP_PORT and OP_ACCESS_TTL must be positive numbers');
  process.exit(2);
}

const USERS = {
  alice: { password: 'alice-pw', email: 'alice@example.test', name: 'Alice Test', groups: ['admins', 'dev'] },
  bob: { password: 'bob-pw', email: 'bob@example.test', name: 'Bob Test', groups: ['dev'] },
  carol: { password: 'carol-pw', email: 'carol@corp.test', name: 'Carol Test', groups: [] },
  // An address the provider let her type in but never checked: it must not make her dave.
  mallory: { password: 'mallory-pw', email: 'dave@example.test', emailVerified: false, name: 'Mallory Test', groups: ['admins'] },
};
const disabled = new Set();
const activeUser = (id) => (Object.hasOwn(USERS, id) && !disabled.has(id) ? USERS[id] : undefined);

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key-1', use: 'sig', alg: 'RS256' };

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
// Our own pages: the built-in ones @import web fonts, which would take a browser off loopback.
const page = (body) => `<!doctype html><html><head><meta charset="utf-8"><title>Test IdP</title></head>
<body style="font-family:sans-serif;margin:2em"><h1>Test IdP</h1>${body}</body></html>`;

const provider = new Provider(ISSUER, {
  jwks: { keys: [jwk] },
  cookies: { keys: ['warren-test-cookie-key-1'] },
  clients: [
    { // confidential web client (the reverse proxy)
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
      redirect_uris: REDIRECT_URIS,
      post_logout_redirect_uris: POST_LOGOUT_REDIRECT_URIS,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: CLIENT_AUTH_METHOD,
    },
    { // public CLI client: device flow + code flow with PKCE
      client_id: 'cli',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      redirect_uris: CLI_REDIRECT_URIS,
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      response_types: ['code'],
    },
  ],
  responseTypes: ['code'],
  pkce: { required: () => true },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  conformIdTokenClaims: false, // email/name/groups in the ID token too
  features: {
    devInteractions: { enabled: false }, // our own /interaction/:uid below
    deviceFlow: {
      enabled: true,
      async userCodeInputSource(ctx, form, out, err) {
        ctx.body = page(`<h2>Enter device code</h2>${err ? `<p id="error">${esc(err.userCode ? 'invalid code' : err.message)}</p>` : ''}${form}<button id="submit" type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      async userCodeConfirmSource(ctx, form, client, deviceInfo, userCode) {
        ctx.body = page(`<h2>Confirm device</h2><p>Client <b>${esc(client.clientId)}</b>, code <code id="user_code">${esc(userCode)}</code></p>${form}<button id="confirm" type="submit" form="op.deviceConfirmForm">Continue</button><button id="abort" type="submit" form="op.deviceConfirmForm" value="yes" name="abort">Abort</button>`);
      },
      async successSource(ctx) { ctx.body = page('<h2 id="device-success">Sign-in Success</h2>'); },
    },
    introspection: { enabled: true },
    revocation: { enabled: true },
    rpInitiatedLogout: {
      enabled: true,
      async logoutSource(ctx, form) {
        const confirmed = form.replace('</form>', '<input type="hidden" name="logout" value="yes"></form>');
        ctx.body = page(`<h2>Sign out?</h2>${confirmed}<button id="logout" type="submit" form="op.logoutForm">Yes, sign out</button>
<script>document.getElementById('op.logoutForm').submit();</script>`);
      },
      async postLogoutSuccessSource(ctx) { ctx.body = page('<h2 id="logged-out">Signed out</h2>'); },
    },
  },
  ttl: {
    AccessToken: ACCESS_TTL,
    IdToken: ACCESS_TTL,
    AuthorizationCode: 60,
    DeviceCode: 600,
    RefreshToken: 24 * 3600,
    Session: 3600,
    Interaction: 600,
    Grant: 24 * 3600,
  },
  async renderError(ctx, out) { ctx.type = 'html'; ctx.body = page(`<pre id="oidc-error">${esc(JSON.stringify(out, null, 2))}</pre>`); },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(ctx, sub) {
    const u = activeUser(sub);
    if (!u) return undefined;
    return { accountId: sub, async claims() { return { sub, email: u.email, email_verified: u.emailVerified ?? true, name: u.name, groups: u.groups }; } };
  },
  // No consent screen: first-party clients get everything they ask for.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid offline_access email profile groups');
    grant.addOIDCClaims(['email', 'email_verified', 'name', 'groups']);
    await grant.save();
    return grant;
  },
});

const readBody = (req) => new Promise((resolve, reject) => {
  let b = '';
  req.on('data', (c) => { b += c; });
  req.on('end', () => resolve(new URLSearchParams(b)));
  req.on('error', reject);
});

const form = (uid) => `<form method="post" action="/interaction/${esc(uid)}">
<label>Username <input id="username" name="username" autofocus></label><br>
<label>Password <input id="password" name="password" type="password"></label><br>
<button id="login" type="submit">Sign in</button></form>`;

async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  if (details.prompt.name === 'consent') { // prompt=consent (offline_access): approve what is missing
    const { grantId, params, session, prompt: { details: d } } = details;
    const grant = grantId ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    if (d.missingResourceScopes) for (const [ind, sc] of Object.entries(d.missingResourceScopes)) grant.addResourceScope(ind, sc.join(' '));
    return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, { mergeWithLastSubmission: true });
  }
  if (details.prompt.name !== 'login') return provider.interactionFinished(req, res, {}, { mergeWithLastSubmission: true });
  if (req.method === 'POST') {
    const f = await readBody(req);
    const name = f.get('username') || '';
    const u = activeUser(name);
    if (u && u.password === f.get('password')) {
      console.log(`login ok: ${name}`);
      return provider.interactionFinished(req, res, { login: { accountId: name } }, { mergeWithLastSubmission: false });
    }
    console.log(`login refused: ${name}`);
    res.writeHead(401, { 'content-type': 'text/html; charset=utf-8' });
    return res.end(page(`<p id="error">Invalid credentials</p>${form(details.uid)}`));
  }
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
  return res.end(page(form(details.uid)));
}

// `POST /test/disable/<user>` and `POST /test/enable/<user>`.
function control(req, res, url) {
  const m = /^\/test\/(disable|enable)\/([^/]+)$/.exec(url.pathname);
  const reply = (status, text) => { res.writeHead(status, { 'content-type': 'text/plain' }); res.end(`${text}\n`); };
  if (!m) return reply(404, 'unknown test endpoint');
  if (req.method !== 'POST') return reply(405, 'POST only');
  const [, action, user] = m;
  if (!Object.hasOwn(USERS, user)) return reply(404, `no such user: ${user}`);
  if (action === 'disable') disabled.add(user); else disabled.delete(user);
  console.log(`${action}d ${user}`);
  return reply(200, `${action}d ${user}`);
}

// oidc-provider drops offline_access unless the request has prompt=consent: add it.
function withConsentForOffline(req, url) {
  if (req.method !== 'GET' || url.pathname !== '/auth') return;
  const scope = (url.searchParams.get('scope') || '').split(' ');
  const prompt = (url.searchParams.get('prompt') || '').split(' ').filter(Boolean);
  if (!scope.includes('offline_access') || prompt.includes('consent') || prompt.includes('none')) return;
  url.searchParams.set('prompt', [...prompt, 'consent'].join(' '));
  req.url = `${url.pathname}?${url.searchParams}`;
}

const cb = provider.callback();
const server = http.createServer((req, res) => {
  const url = new URL(req.url, ISSUER);
  console.log(`${req.method} ${url.pathname}`);
  if (url.pathname.startsWith('/test/')) return control(req, res, url);
  if (url.pathname.startsWith('/interaction/')) {
    return interaction(req, res).catch((e) => {
      console.log(`interaction error: ${e.message}`);
      if (!res.headersSent) res.writeHead(400, { 'content-type': 'text/plain' });
      res.end(`interaction error: ${e.message}\n`);
    });
  }
  withConsentForOffline(req, url);
  return cb(req, res);
});
server.listen(OP_PORT, '127.0.0.1', () => console.log(`oidc-provider listening on ${ISSUER}`));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => { server.close(); process.exit(0); });

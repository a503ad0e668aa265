// Headless Debian Chromium, driven by playwright-core, as a person would use Warren's web access.
//
// Usage: node browser.mjs --url URL [--user U --password P] [--click SELECTOR]
//                         [--storage-in FILE] [--storage-out FILE] [--ws WS_URL] [--timeout-ms N]
//                         [--viewport WxH] [--screenshot FILE.png] [--color-scheme light|dark]
//
// Opens URL (following redirects and navigations the page starts itself). If the IdP login form
// (#username) shows and --user is given, fills #username/#password and clicks #login; if the
// element --click names shows (e.g. #confirm on the IdP's device-flow page), clicks it once; each
// time it waits for where that leads. With --ws, opens a
// WebSocket from the landed page to WS_URL, sends "hello-ws" and records the first reply.
// --storage-in/--storage-out load and save Playwright's storageState (cookies + local storage).
// --viewport sets the window size (default 1280x720); --screenshot saves the landed page, whole;
// --color-scheme is what the page's prefers-color-scheme media query sees (default light).
//
// Prints exactly one JSON line on stdout:
//   {"url", "status", "text", "ws", "cookies": [{name, domain, path, httpOnly, secure, sameSite, value}],
//    "layout": {lang, title, h1, styled, overflowX, unlabeled, tooSmall, dark, contrast, lowContrast}}
// layout describes the landed page as a person meets it: its language and title, the first
// heading, whether a stylesheet applies to it (<main> has a max width), whether it scrolls
// sideways, inputs without a label, buttons/links smaller than 24x24 CSS px, whether the page's
// own background is dark, the lowest WCAG contrast ratio of any visible text against the
// background it sits on, and the texts below 4.5:1.
// where status is the HTTP status of the last main-frame response (not a redirect) and ws is the
// echoed text or null (why it failed goes to stderr). Exits non-zero with a message on stderr on
// timeout or error. Every request to a host other than loopback (127.0.0.0/8, ::1, localhost,
// *.localhost) is reported on stderr as `non-loopback request: <url>`; every console error
// (a refused stylesheet or script, say) as `console error: <text>`.
import { chromium } from 'playwright-core';

function parseArgs(argv) {
  const known = new Set(['url', 'user', 'password', 'click', 'storage-in', 'storage-out', 'ws', 'timeout-ms', 'viewport', 'screenshot', 'color-scheme']);
  const out = {};
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    if (!a.startsWith('--') || !known.has(a.slice(2))) throw new Error(`unknown argument: ${a}`);
    if (i + 1 >= argv.length) throw new Error(`missing value for ${a}`);
    out[a.slice(2)] = argv[i + 1];
    i += 1;
  }
  if (!out.url) throw new Error('--url is required');
  if ((out.user === undefined) !== (out.password === undefined)) throw new Error('--user and --password go together');
  const t = Number(out['timeout-ms'] ?? 20000);
  if (!Number.isFinite(t) || t <= 0) throw new Error('--timeout-ms must be a positive number');
  out.timeoutMs = t;
  if (out.viewport !== undefined) {
    const m = /^(\d+)x(\d+)$/.exec(out.viewport);
    if (!m) throw new Error('--viewport is WIDTHxHEIGHT, like 390x844');
    out.viewportSize = { width: Number(m[1]), height: Number(m[2]) };
  }
  if (out['color-scheme'] !== undefined && !['light', 'dark'].includes(out['color-scheme'])) {
    throw new Error('--color-scheme is light or dark');
  }
  return out;
}

function isLoopbackHost(host) {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h.endsWith('.localhost') || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}

function checkLoopback(rawUrl) {
  let u;
  try { u = new URL(rawUrl); } catch { return; }
  if (!['http:', 'https:', 'ws:', 'wss:'].includes(u.protocol)) return;
  if (!isLoopbackHost(u.hostname)) console.error(`non-loopback request: ${rawUrl}`);
}

let args;
try {
  args = parseArgs(process.argv.slice(2));
} catch (e) {
  console.error(`browser.mjs: ${e.message}`);
  process.exit(2);
}
const deadline = Date.now() + args.timeoutMs;
const left = () => Math.max(1, deadline - Date.now());
// Hard stop: process.exit runs Playwright's exit handler, which kills Chromium.
const timer = setTimeout(() => {
  console.error(`browser.mjs: timed out after ${args.timeoutMs} ms`);
  process.exit(3);
}, args.timeoutMs);

let browser;
try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    timeout: left(),
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    ...(args.viewportSize ? { viewport: args.viewportSize } : {}),
    colorScheme: args['color-scheme'] ?? 'light',
    ...(args['storage-in'] ? { storageState: args['storage-in'] } : {}),
  });
  context.on('request', (r) => checkLoopback(r.url()));
  context.on('websocket', (ws) => checkLoopback(ws.url()));
  const page = await context.newPage();
  page.setDefaultTimeout(args.timeoutMs);
  page.on('websocket', (ws) => checkLoopback(ws.url()));
  page.on('console', (m) => { if (m.type() === 'error') console.error(`console error: ${m.text()}`); });

  let status = null; // last main-frame response that is not a redirect
  let lastAny = null; // last main-frame response, redirects included
  const mainNav = (r) => r.isNavigationRequest() && r.frame() === page.mainFrame();
  const inflight = new Set(); // main-frame navigation requests not finished yet
  page.on('request', (r) => { if (mainNav(r)) inflight.add(r); });
  page.on('requestfinished', (r) => inflight.delete(r));
  page.on('requestfailed', (r) => inflight.delete(r));
  page.on('response', (r) => {
    if (!mainNav(r.request())) return;
    lastAny = r.status();
    if (r.status() < 300 || r.status() >= 400) status = r.status();
  });
  const sleep = (ms) => new Promise((res) => { setTimeout(res, ms); });
  // Waits until the page has loaded and no main-frame navigation is under way, including
  // ones the page starts itself (scripts submitting forms, redirects).
  const settle = async () => {
    for (;;) {
      await page.waitForLoadState('load', { timeout: left() });
      await sleep(50);
      if (inflight.size === 0) return;
      while (inflight.size > 0) await sleep(20);
    }
  };
  const clickAndSettle = async (selector) => {
    const started = page.waitForEvent('request', { predicate: mainNav, timeout: left() });
    await page.click(selector, { timeout: left() });
    await started;
    await settle();
  };

  await page.goto(args.url, { waitUntil: 'load', timeout: left() });
  await settle();
  let loggedIn = false;
  let clicked = false;
  for (let step = 0; step < 4; step += 1) {
    if (args.user !== undefined && !loggedIn && await page.$('#username')) {
      await page.fill('#username', args.user, { timeout: left() });
      await page.fill('#password', args.password, { timeout: left() });
      loggedIn = true;
      await clickAndSettle('#login');
    } else if (args.click && !clicked && await page.$(args.click)) {
      clicked = true;
      await clickAndSettle(args.click);
    } else {
      break;
    }
  }

  let wsReply = null;
  if (args.ws) {
    try {
      wsReply = await page.evaluate(([url, ms]) => new Promise((resolve, reject) => {
        const ws = new WebSocket(url);
        const t = setTimeout(() => { ws.close(); reject(new Error(`no reply within ${ms} ms`)); }, ms);
        ws.onopen = () => ws.send('hello-ws');
        ws.onmessage = (e) => { clearTimeout(t); ws.close(); resolve(String(e.data)); };
        ws.onerror = () => { clearTimeout(t); reject(new Error('WebSocket error (handshake refused or connection failed)')); };
        ws.onclose = (e) => { clearTimeout(t); reject(new Error(`WebSocket closed: code ${e.code} ${e.reason}`)); };
      }), [args.ws, Math.max(1, left() - 500)]);
    } catch (e) {
      console.error(`browser.mjs: websocket ${args.ws}: ${e.message.split('\n')[0]}`);
    }
  }

  const text = await page.evaluate(() => (document.body ? document.body.innerText : ''));
  const cookies = (await context.cookies()).map((c) => ({
    name: c.name, domain: c.domain, path: c.path, httpOnly: c.httpOnly, secure: c.secure, sameSite: c.sameSite, value: c.value,
  }));
  if (args['storage-out']) await context.storageState({ path: args['storage-out'] });
  const layout = await page.evaluate(() => {
    const main = document.querySelector('main');
    const h1 = document.querySelector('h1');
    const labelled = (el) => el.type === 'hidden' || el.labels?.length > 0 || el.getAttribute('aria-label');
    const small = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && (r.width < 24 || r.height < 24); };
    // WCAG 2 relative luminance and contrast, over the first opaque background up the tree.
    const rgba = (c) => { const m = c.match(/[\d.]+/g) || []; return m.map(Number).concat([1]).slice(0, 4); };
    const lum = ([r, g, b]) => {
      const ch = (v) => { const x = v / 255; return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; };
      return 0.2126 * ch(r) + 0.7152 * ch(g) + 0.0722 * ch(b);
    };
    const background = (el) => {
      for (let e = el; e; e = e.parentElement) {
        const c = rgba(getComputedStyle(e).backgroundColor);
        if (c[3] > 0.5) return c;
      }
      return [255, 255, 255, 1];
    };
    const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
    const texts = [...document.querySelectorAll('body *')].filter((el) => {
      const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
      const r = el.getBoundingClientRect();
      return own && r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden';
    });
    const measured = texts.map((el) => ({ text: el.innerText.trim().slice(0, 40), ratio: ratio(rgba(getComputedStyle(el).color), background(el)) }));
    return {
      lang: document.documentElement.lang,
      title: document.title,
      h1: h1 ? h1.innerText : null,
      styled: !!main && getComputedStyle(main).maxWidth !== 'none',
      overflowX: document.documentElement.scrollWidth > window.innerWidth,
      unlabeled: [...document.querySelectorAll('input')].filter((el) => !labelled(el)).length,
      tooSmall: [...document.querySelectorAll('button, a')].filter(small).map((el) => el.innerText),
      dark: lum(background(document.body)) < 0.2,
      contrast: measured.length ? Math.min(...measured.map((m) => m.ratio)) : null,
      lowContrast: measured.filter((m) => m.ratio < 4.5).map((m) => `${m.text} (${m.ratio.toFixed(2)}:1)`),
    };
  });
  if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
  const result = { url: page.url(), status: status ?? lastAny, text, ws: wsReply, cookies, layout };
  await browser.close();
  clearTimeout(timer);
  process.stdout.write(`${JSON.stringify(result)}\n`);
} catch (e) {
  console.error(`browser.mjs: ${e.message.split('\n')[0]}`);
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}

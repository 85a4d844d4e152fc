// A stand-in for catalog-cache's admin listener, just enough for the status
// page: GET / (the real src/status_page.html), GET /status, GET /history (an
// hour that ends in an upstream outage, see mockHistory), GET/PUT
// /admin/breaker and /admin/stale with the bearer-token check and the
// Backstage-shaped 401. It lets the page be developed and tested without a
// build of the sidecar. Run alone: `node mock_admin.mjs` (PORT, ADMIN_TOKEN,
// MOCK_SCENARIO=outage, MOCK_HISTORY=hour|empty|short).
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const PAGE = path.join(here, '..', '..', 'src', 'status_page.html');

const MODES = ['auto', 'open', 'closed'];
const POLICIES = ['serve', 'refuse'];

function parseDuration(text) {
  const m = /^(\d+)(ms|s|m|h|d)$/.exec(String(text));
  if (!m) return null;
  const unit = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
  return Number(m[1]) * unit;
}

function backstageError(req, status, name, message) {
  return {
    error: { name, message },
    request: { method: req.method, url: req.url },
    response: { statusCode: status },
  };
}

/**
 * Puts the mock's state into an upstream outage with a held mass deletion,
 * so the page's error and warning renderings can be looked at and tested.
 */
export function outage(state) {
  const ago = (s) => new Date(Date.now() - s * 1000).toISOString().replace(/\.\d+Z$/, 'Z');
  Object.assign(state.breaker, { state: 'open', since: ago(420), consecutive_failures: 7 });
  state.last_sync = { result: 'failed', at: ago(30), duration_seconds: 2.0, added: 0, changed: 0, removed: 0, unchanged: 0,
    error: 'upstream timed out after 2s (GET /entities/by-query)' };
  state.held_deletions = { would_remove: 4000, of: 5000, ratio: 0.8, since: ago(3600) };
  state.upstream.last_error = { message: 'connect to 127.0.0.1:7007 refused', at: ago(5) };
  state.upstream.stale = true;
  state.audit.push({ at: ago(420), actor: 'breaker', subject: 'breaker_state', from: 'closed', to: 'open', reason: '5 consecutive failures' });
}

const OUTCOMES = ['hit', 'miss', 'stale', 'refused', 'error', 'bypass'];
/** The outage in mockHistory starts this long before the mock did, as in outage(). */
export const OUTAGE_SECONDS = 420;
const FRESH_FOR = 90;

// A repeatable pseudo-random number in [0, 1) for second t and stream k.
function rnd(t, k) {
  const x = Math.sin(t * 12.9898 + k * 78.233) * 43758.5453;
  return x - Math.floor(x);
}

/**
 * GET /history as the sidecar answers it: the hour of seconds ending at
 * `end` (Unix seconds), each a pure function of its second. The sidecar
 * started an hour before `start` (the first seconds have no generation yet).
 * Until `start - OUTAGE_SECONDS` the upstream is fine: mostly fresh reads,
 * some revalidated, a rare client error and write, a sync a minute (a few
 * held deletions on the way). Then it refuses connections: reads stay fresh
 * until the data is older than fresh_for, then turn stale, the odd one
 * refused (no local copy); the breaker is open with a half-open probe a
 * minute; every sync fails.
 */
export function mockHistory(start, end = start, seconds = 3600) {
  const born = start - 3600 + 3;
  const outageFrom = start - OUTAGE_SECONDS;
  const syncEnds = (t) => t % 60 === 7; // a sync ends at :07 of each minute
  let lastConfirmed = null;
  // Replay from the sidecar's start so data age is continuous.
  const at = [];
  const reads = Object.fromEntries(OUTCOMES.map((o) => [o, []]));
  const dataAge = [];
  const breaker = [];
  const syncs = [];
  const totals = Object.fromEntries(OUTCOMES.map((o) => [o, 0]));
  const first = end - seconds + 1;
  for (let t = Math.min(born, first); t <= end; t += 1) {
    const up = t < outageFrom;
    let sync = null;
    if (t >= born && syncEnds(t)) {
      if (!up) sync = { at: t, result: 'failed', duration_seconds: rnd(t, 9) < 0.5 ? 2.0 : 0.01 + rnd(t, 8) * 0.02 };
      else if (t > start - 1800 && t < start - 1560) sync = { at: t, result: 'held', duration_seconds: 0.6 + rnd(t, 8) * 0.3 };
      else sync = { at: t, result: rnd(t, 7) < 0.25 ? 'applied' : 'unchanged', duration_seconds: 0.3 + rnd(t, 8) * 0.35 };
      if (sync.result !== 'failed') lastConfirmed = t;
    } else if (t === born) {
      sync = { at: t, result: 'applied', duration_seconds: 1.4 };
      lastConfirmed = t;
    }
    const age = lastConfirmed == null ? null : t - lastConfirmed + 0.25;
    const open = !up && (t - outageFrom) >= 3;
    const load = t < born ? 0 : Math.round(14 + 8 * Math.sin(t / 300) + rnd(t, 1) * 6);
    const row = { hit: 0, miss: 0, stale: 0, refused: 0, error: 0, bypass: 0 };
    if (age == null) row.refused = load ? 1 : 0;
    else if (age < FRESH_FOR) {
      row.hit = load;
      if (up && rnd(t, 2) < 0.3) row.miss = 1 + Math.floor(rnd(t, 3) * 3); // uncached queries
    } else if (up) {
      row.miss = load;
    } else {
      row.stale = load;
      if (rnd(t, 4) < 0.2) row.refused = 1 + Math.floor(rnd(t, 5) * 2);
    }
    if (t >= born && rnd(t, 6) < 0.02) row.error = 1;
    if (t >= born && rnd(t, 10) < 0.03) row.bypass = 1;
    for (const o of OUTCOMES) totals[o] += row[o]; // since the start, as /metrics counts
    if (t < first) continue;
    if (sync) syncs.push(sync);
    at.push(t);
    dataAge.push(age);
    breaker.push(t < born ? null : !open ? 'closed' : (t - outageFrom) % 60 === 59 ? 'half_open' : 'open');
    for (const o of OUTCOMES) reads[o].push(row[o]);
  }
  return { at, reads, data_age_seconds: dataAge, breaker, syncs, totals };
}

/** An answer with no seconds yet, as right after the sidecar started. */
export function emptyHistory() {
  return { at: [], reads: Object.fromEntries(OUTCOMES.map((o) => [o, []])), data_age_seconds: [], breaker: [], syncs: [],
    totals: Object.fromEntries(OUTCOMES.map((o) => [o, 0])) };
}

/**
 * A history only a few seconds long, as a few seconds after the sidecar
 * started: no generation in the first second (no data age), one sync, a
 * handful of reads, the breaker closed.
 */
export function shortHistory(end) {
  const at = [end - 3, end - 2, end - 1, end];
  const reads = { hit: [0, 2, 3, 1], miss: [0, 1, 0, 0], stale: [0, 0, 0, 0], refused: [1, 0, 0, 0], error: [0, 0, 0, 0], bypass: [0, 0, 0, 0] };
  const totals = Object.fromEntries(OUTCOMES.map((o) => [o, reads[o].reduce((a, b) => a + b, 0)]));
  return { at, reads, data_age_seconds: [null, 0.2, 1.2, 2.2], breaker: ['closed', 'closed', 'closed', 'closed'],
    syncs: [{ at: end - 2, result: 'applied', duration_seconds: 0.8 }], totals };
}

/** Starts the mock on 127.0.0.1; resolves to { url, server, state, close() }. */
export function startMock({ port = 0, token = 'test-admin-token' } = {}) {
  const now = () => new Date().toISOString().replace(/\.\d+Z$/, 'Z');
  const startedAt = Date.now();
  const state = {
    version: '0.1.0',
    ready: true,
    ready_reason: 'mirror generation 3 loaded',
    breaker: { state: 'closed', mode: 'auto', reason: null, since: now(), mode_expires_at: null, consecutive_failures: 0 },
    stale: { policy: 'serve', max_stale_seconds: 86400 },
    freshness: { fresh_for_seconds: FRESH_FOR },
    mirror: { generation: 3, entities: 5000, synced_at: now(), data_age_seconds: 12.3 },
    last_sync: { result: 'applied', at: now(), duration_seconds: 0.41, added: 0, changed: 3, removed: 0, unchanged: 4997, error: null },
    held_deletions: null,
    upstream: { url: 'http://127.0.0.1:7007/api/catalog', kind: 'catalog-cache', stale: false, cache_status: 'tier-eu; hit', last_error: null },
    audit: [{ at: now(), actor: 'config', subject: 'stale_policy', from: 'serve', to: 'serve', reason: 'loaded from config/catalog-cache.toml' }],
    // What GET /history answers: 'hour' (mockHistory), 'empty', 'short'
    // (shortHistory), 'truncated' (a 200 whose JSON is cut off), 'malformed'
    // (columns of unequal length), 'error' (a 500) or 'hang' (no answer for
    // 30 s).
    history: 'hour',
  };
  const startSec = Math.floor(startedAt / 1000);

  // Like the sidecar: the actor header names the CLI or the status page.
  const audit = (subject, from, to, reason, actor = 'admin-token') => {
    state.audit.push({ at: now(), actor, subject, from, to, reason: reason ?? null });
    if (state.audit.length > 20) state.audit.shift();
  };

  const actorOf = (req) => {
    const a = req.headers['x-catalog-cache-actor'];
    return a === 'cli' || a === 'status-page' ? a : 'admin-token';
  };

  const send = (res, status, body, type = 'application/json') => {
    const data = type === 'application/json' ? JSON.stringify(body) : body;
    res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
    res.end(data);
  };

  const readBody = (req) => new Promise((resolve, reject) => {
    let data = '';
    req.on('data', (c) => { data += c; if (data.length > 65536) reject(new Error('too large')); });
    req.on('end', () => resolve(data));
    req.on('error', reject);
  });

  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://localhost');
    state.mirror.data_age_seconds = 12.3 + (Date.now() - startedAt) / 1000;
    if (state.breaker.mode_expires_at && Date.parse(state.breaker.mode_expires_at) <= Date.now()) {
      audit('breaker_mode', state.breaker.mode, 'auto', 'override expired');
      Object.assign(state.breaker, { mode: 'auto', mode_expires_at: null, reason: null });
    }
    try {
      if (req.method === 'GET' && url.pathname === '/') return send(res, 200, readFileSync(PAGE, 'utf8'), 'text/html; charset=utf-8');
      if (req.method === 'GET' && url.pathname === '/status') return send(res, 200, { ...state, audit: [...state.audit].reverse() }); // newest first, as the sidecar sends it
      if (req.method === 'GET' && url.pathname === '/history') {
        const h = state.history;
        if (h === 'empty') return send(res, 200, emptyHistory());
        if (h === 'short') return send(res, 200, shortHistory(Math.floor(Date.now() / 1000)));
        if (h === 'error') return send(res, 500, backstageError(req, 500, 'Error', 'history is broken on purpose'));
        if (h === 'hang') { setTimeout(() => res.destroyed || send(res, 200, emptyHistory()), 30_000).unref(); return undefined; }
        const body = mockHistory(startSec, Math.floor(Date.now() / 1000));
        if (h === 'malformed') { body.reads.stale = body.reads.stale.slice(1); return send(res, 200, body); }
        if (h === 'truncated') return send(res, 200, JSON.stringify(body).slice(0, 1000), 'application/json; charset=utf-8');
        return send(res, 200, body);
      }
      if (req.method === 'GET' && url.pathname === '/livez') return send(res, 200, { status: 'ok' });
      if (req.method === 'GET' && url.pathname === '/readyz') return send(res, 200, { ready: true, reason: state.ready_reason });
      if (req.method === 'GET' && url.pathname === '/admin/breaker') return send(res, 200, state.breaker);
      if (req.method === 'GET' && url.pathname === '/admin/stale') return send(res, 200, state.stale);
      if (req.method === 'PUT' && (url.pathname === '/admin/breaker' || url.pathname === '/admin/stale')) {
        const auth = req.headers.authorization || '';
        if (!auth.startsWith('Bearer ')) return send(res, 401, backstageError(req, 401, 'AuthenticationError', 'Missing credentials'));
        if (auth.slice(7) !== token) return send(res, 401, backstageError(req, 401, 'AuthenticationError', 'Illegal token'));
        let body;
        try { body = JSON.parse(await readBody(req)); } catch { return send(res, 400, backstageError(req, 400, 'InputError', 'body must be JSON')); }
        if (url.pathname === '/admin/breaker') {
          if (!MODES.includes(body.mode)) return send(res, 400, backstageError(req, 400, 'InputError', `mode must be one of ${MODES.join(', ')}`));
          let expires = null;
          if (body.for != null) {
            const secs = parseDuration(body.for);
            if (secs == null) return send(res, 400, backstageError(req, 400, 'InputError', `invalid duration '${body.for}', expected e.g. 90s, 10m, 2h`));
            expires = new Date(Date.now() + secs * 1000).toISOString().replace(/\.\d+Z$/, 'Z');
          }
          // As in the sidecar: a forced mode overrides admission and leaves
          // the state machine's state alone.
          audit('breaker_mode', state.breaker.mode, body.mode, body.for ? `${body.reason} (for ${body.for})` : body.reason, actorOf(req));
          Object.assign(state.breaker, { mode: body.mode, reason: body.reason ?? null, mode_expires_at: expires });
          return send(res, 200, state.breaker);
        }
        if (!POLICIES.includes(body.policy)) return send(res, 400, backstageError(req, 400, 'InputError', `policy must be one of ${POLICIES.join(', ')}`));
        if (body.max_stale != null) {
          const secs = parseDuration(body.max_stale);
          if (secs == null) return send(res, 400, backstageError(req, 400, 'InputError', `invalid duration '${body.max_stale}'`));
          state.stale.max_stale_seconds = secs;
        }
        audit('stale_policy', state.stale.policy, body.policy, body.reason, actorOf(req));
        state.stale.policy = body.policy;
        return send(res, 200, state.stale);
      }
      return send(res, 404, backstageError(req, 404, 'NotFoundError', `no route for ${req.method} ${url.pathname}`));
    } catch (e) {
      return send(res, 500, backstageError(req, 500, 'Error', String(e && e.message)));
    }
  });

  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      const { port: p } = server.address();
      resolve({ url: `http://127.0.0.1:${p}`, server, state,
        close: () => new Promise((r) => { server.close(r); server.closeAllConnections(); }) });
    });
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const token = process.env.ADMIN_TOKEN || 'test-admin-token';
  const m = await startMock({ port: Number(process.env.PORT || 7071), token });
  if (process.env.MOCK_SCENARIO === 'outage') outage(m.state);
  if (process.env.MOCK_HISTORY) m.state.history = process.env.MOCK_HISTORY;
  console.log(`mock admin listener on ${m.url} (token: ${token})`);
}

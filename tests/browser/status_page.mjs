// Drives the admin status page (GET /) in a real headless Chromium the way an
// operator would: reads the breaker state, enters the admin token, opens the
// breaker with a reason and sees it in the audit table, sets it back to auto,
// flips the stale policy to refuse and back, and checks that a wrong token is
// reported as a 401. The charts of the last hour (GET history): each is an
// SVG with its series, and the totals each draws equal the sums of the
// columns of the very history answer it drew, no coordinate is NaN, and the
// charts are redrawn as new seconds arrive. Against the mock: "no data yet"
// before the first sample, a history of a few seconds, an hour ending in an
// outage (drawn where it happened: the breaker band turns open and the reads
// turn stale at the right end, after the fresh reads), and broken history
// answers that leave the rest of the page working. Against a real
// sidecar with CONTROL_URL and PROXY_URL: the upstream refuses connections
// while the test reads, and the charts then show stale reads and the breaker
// open (the fault is cleared at the end). Exits non-zero on the first failure.
//
//   ADMIN_URL    admin listener, e.g. http://127.0.0.1:7071 (unset: start mock_admin.mjs)
//   ADMIN_TOKEN  the admin token (required with ADMIN_URL)
//   CONTROL_URL  the demo catalog's control listener, e.g. http://127.0.0.1:7017
//                (catalog-chaos fake-catalog --control); with ADMIN_URL, for the outage
//   PROXY_URL    the sidecar's catalog API, e.g. http://127.0.0.1:7070/api/catalog;
//                with CONTROL_URL. Run that sidecar with a short freshness.fresh_for
//                (e.g. 2s) so reads turn stale within seconds of the outage.
//   SCREENSHOT   where to write a PNG of the page (default in the temp dir);
//                -open.png and -outage.png (the mock's, or the real outage) beside it
//   CHROMIUM     browser binary (default /usr/bin/chromium)
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { startMock, outage } from './mock_admin.mjs';

const TIMEOUT_MS = 10_000;
const HISTORY_TIMEOUT_MS = 15_000; // the page polls GET history every 5 s
const OUTAGE_TIMEOUT_MS = 60_000;
const READ_OUTCOMES = ['hit', 'miss', 'stale', 'refused', 'error'];
const BREAKER_STATES = ['closed', 'half_open', 'open'];
const CHARTS = ['chart-reads', 'chart-breaker', 'chart-age', 'chart-syncs'];
const screenshot = process.env.SCREENSHOT || path.join(os.tmpdir(), 'catalog-cache-status-page.png');

let mock = null;
let adminUrl = process.env.ADMIN_URL;
let token = process.env.ADMIN_TOKEN;
if (!adminUrl) {
  token = token || 'test-admin-token';
  mock = await startMock({ token });
  mock.state.history = 'empty'; // until the "no data yet" step has looked
  adminUrl = mock.url;
  console.log(`no ADMIN_URL: testing against the mock at ${adminUrl}`);
} else if (!token) {
  console.error('ADMIN_TOKEN is required when ADMIN_URL is set');
  process.exit(2);
}
adminUrl = adminUrl.replace(/\/+$/, '');
const controlUrl = (process.env.CONTROL_URL || '').replace(/\/+$/, '');
const proxyUrl = (process.env.PROXY_URL || '').replace(/\/+$/, '');

let passed = 0;
let failed = 0;
async function step(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}: ${e && e.message ? e.message.split('\n')[0] : e}`);
    throw e;
  }
}

const assert = (cond, msg) => { if (!cond) throw new Error(msg); };

// Waits until the element's text satisfies pred(text, arg), so the 2 s poll
// cannot race the check. pred runs in the page: it sees only its arguments.
async function waitText(page, selector, pred, what, arg = null, timeout = TIMEOUT_MS) {
  try {
    await page.waitForFunction(
      ([sel, src, a]) => {
        const el = document.querySelector(sel);
        // eslint-disable-next-line no-new-func
        return el && new Function('t', 'a', `return (${src})(t, a)`)(el.textContent.trim(), a);
      },
      [selector, pred.toString(), arg],
      { timeout },
    );
  } catch {
    const actual = await page.locator(selector).textContent().catch(() => '<missing>');
    throw new Error(`${selector}: expected ${what}, saw ${JSON.stringify(actual && actual.trim())}`);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});

const sum = (a) => a.reduce((x, y) => x + y, 0);

// What the charts must draw for one GET history answer: the sums of its columns.
function expectedCharts(body) {
  const syncs = {};
  for (const s of body.syncs) syncs[s.result] = (syncs[s.result] || 0) + 1;
  const ages = body.data_age_seconds.filter((a) => a != null);
  return {
    reads: Object.fromEntries(READ_OUTCOMES.map((o) => [o, sum(body.reads[o] || [])])),
    breaker: Object.fromEntries(BREAKER_STATES.map((b) => [b, body.breaker.filter((x) => x === b).length])),
    syncs,
    syncDots: body.syncs.length,
    age: ages.length ? { points: ages.length, max: Math.max(...ages) } : null,
  };
}

// What the charts drew, read from the SVG: one element per series with its total.
function drawnCharts(page) {
  return page.evaluate(([charts]) => {
    const all = (sel) => [...document.querySelectorAll(sel)];
    const series = (chart, attr) => Object.fromEntries(all(`#${chart} svg [data-series]`)
      .map((e) => [e.getAttribute('data-series'), Number(e.getAttribute(attr))]));
    const age = document.querySelector('#chart-age svg [data-series="data_age"]');
    const fresh = document.querySelector('#chart-age svg [data-mark="fresh_for"]');
    return {
      at: document.getElementById('history').dataset.at || '',
      states: Object.fromEntries(charts.map((c) => [c, document.getElementById(c).dataset.state || ''])),
      labels: Object.fromEntries(charts.map((c) => [c, document.querySelector(`#${c} svg`)?.getAttribute('aria-label') || ''])),
      reads: series('chart-reads', 'data-total'),
      breaker: series('chart-breaker', 'data-seconds'),
      syncs: series('chart-syncs', 'data-total'),
      syncDots: all('#chart-syncs svg circle').length,
      age: age ? { points: Number(age.dataset.points), max: Number(age.dataset.max) } : null,
      freshFor: fresh ? Number(fresh.dataset.seconds) : null,
      note: document.getElementById('history-note').textContent,
    };
  }, [CHARTS]);
}

// Attributes of the charts' SVG that hold NaN, Infinity or undefined: a
// drawing bug that the browser would silently not draw.
function badAttributes(page) {
  return page.evaluate(() => {
    const bad = [];
    for (const el of document.querySelectorAll('#history svg, #history svg *')) {
      for (const a of el.attributes) {
        if (/NaN|Infinity|undefined/.test(a.value)) bad.push(`<${el.tagName} ${a.name}="${a.value.slice(0, 60)}">`);
      }
    }
    return bad.slice(0, 5);
  });
}

// Where the hour's outage is drawn, in the SVG's pixels: the plot's left and
// right (the reads chart's base line), the breaker's closed and open runs,
// and the x columns (every 2 px) where the reads chart fills each outcome.
function outagePlacement(page) {
  return page.evaluate(() => {
    const base = document.querySelector('#chart-reads svg line.base');
    const left = Number(base.getAttribute('x1'));
    const right = Number(base.getAttribute('x2'));
    const runs = (state) => [...document.querySelectorAll(`#chart-breaker svg g[data-series="${state}"] rect`)]
      .map((r) => [Number(r.getAttribute('x')), Number(r.getAttribute('x')) + Number(r.getAttribute('width'))]);
    const top = Number(document.querySelector('#chart-reads svg line.grid[y1]')?.getAttribute('y1') || 0);
    const bottom = Number(base.getAttribute('y1'));
    const filled = (series) => {
      const path = document.querySelector(`#chart-reads svg path[data-series="${series}"]`);
      const xs = [];
      for (let x = left + 1; x < right; x += 2) {
        for (let y = top; y <= bottom; y += 1) {
          if (path.isPointInFill(new DOMPoint(x, y))) { xs.push(x); break; }
        }
      }
      return xs;
    };
    return { left, right, closed: runs('closed'), open: runs('open'), half: runs('half_open'),
      hit: filled('hit'), stale: filled('stale') };
  });
}

function compareCharts(drawn, want) {
  const wrong = [];
  for (const o of READ_OUTCOMES) {
    if (drawn.reads[o] !== want.reads[o]) wrong.push(`reads ${o}: drew ${drawn.reads[o]}, the columns sum to ${want.reads[o]}`);
  }
  for (const b of BREAKER_STATES) {
    if (drawn.breaker[b] !== want.breaker[b]) wrong.push(`breaker ${b}: drew ${drawn.breaker[b]} s, the column has ${want.breaker[b]}`);
  }
  for (const r of new Set([...Object.keys(want.syncs), ...Object.keys(drawn.syncs)])) {
    if ((drawn.syncs[r] || 0) !== (want.syncs[r] || 0)) wrong.push(`syncs ${r}: drew ${drawn.syncs[r]}, the answer has ${want.syncs[r] || 0}`);
  }
  if (drawn.syncDots !== want.syncDots) wrong.push(`sync dots: ${drawn.syncDots}, syncs: ${want.syncDots}`);
  if (JSON.stringify(drawn.age) !== JSON.stringify(want.age)) wrong.push(`data age: drew ${JSON.stringify(drawn.age)}, want ${JSON.stringify(want.age)}`);
  return wrong;
}

// Waits until the charts are drawn from a history answer the page was sent
// (captured from the network, so the comparison is with exactly what it
// drew) that satisfies accept(body), and checks every drawn total against
// the sums of that answer's columns. Resolves to { drawn, body }.
async function chartsAgree(page, bodies, accept = () => true, timeout = HISTORY_TIMEOUT_MS, what = 'a history answer') {
  const until = Date.now() + timeout;
  let last = null;
  for (;;) {
    const drawn = await page.evaluate(() => document.getElementById('history').dataset.at || '')
      .then((at) => (bodies.has(Number(at)) ? drawnCharts(page) : null));
    if (drawn && bodies.has(Number(drawn.at))) {
      const body = bodies.get(Number(drawn.at));
      last = { drawn, body };
      if (accept(body)) {
        const wrong = compareCharts(drawn, expectedCharts(body));
        assert(wrong.length === 0, `the charts disagree with GET history: ${wrong.join('; ')}`);
        for (const c of CHARTS) assert(drawn.states[c] === 'drawn', `${c} is ${drawn.states[c] || 'not drawn'}`);
        for (const c of CHARTS) assert(drawn.labels[c].length > 20, `${c} has no accessible label`);
        return last;
      }
    }
    if (Date.now() > until) {
      throw new Error(`no chart drawn from ${what} within ${timeout / 1000}s` +
        (last ? ` (last drawn: reads ${JSON.stringify(last.drawn.reads)}, breaker ${JSON.stringify(last.drawn.breaker)})` : ''));
    }
    await page.waitForTimeout(200);
  }
}

async function control(method, body) {
  const r = await fetch(`${controlUrl}/faults`, {
    method,
    headers: body ? { 'Content-Type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  assert(r.ok, `${method} ${controlUrl}/faults answered ${r.status}`);
}

const reason = `status page test ${new Date().toISOString()}`;
let exitCode = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  const externalRequests = [];
  page.on('request', (r) => { if (!r.url().startsWith(adminUrl)) externalRequests.push(r.url()); });
  // Every GET history answer the page receives, by its last second.
  const historyBodies = new Map();
  page.on('response', async (r) => {
    if (new URL(r.url()).pathname !== new URL(`${adminUrl}/history`).pathname || r.status() !== 200) return;
    try {
      const body = await r.json();
      if (Array.isArray(body.at) && body.at.length) historyBodies.set(body.at[body.at.length - 1], body);
    } catch { /* a broken answer, on purpose: the page must cope */ }
  });

  await step('page loads from GET /', async () => {
    const resp = await page.goto(`${adminUrl}/`, { waitUntil: 'load', timeout: TIMEOUT_MS });
    assert(resp && resp.ok(), `GET / answered ${resp && resp.status()}`);
    assert((resp.headers()['content-type'] || '').includes('text/html'), 'GET / is not text/html');
  });

  await step('breaker state, mode, stale policy and mirror facts are shown', async () => {
    await waitText(page, '#breaker-state', (t) => ['closed', 'open', 'half_open'].includes(t), 'closed|open|half_open');
    await waitText(page, '#breaker-mode', (t) => ['auto', 'open', 'closed'].includes(t), 'auto|open|closed');
    await waitText(page, '#stale-policy', (t) => ['serve', 'refuse'].includes(t), 'serve|refuse');
    await waitText(page, '#entities', (t) => /^[\d,]+$/.test(t), 'an entity count');
    await waitText(page, '#data-age', (t) => /^\d+[smhd]( \d+[smh])?$/.test(t), 'a data age like 12s or 3m 4s');
  });

  if (mock) {
    await step('mock, before the first sample: every chart says "no data yet"', async () => {
      await page.waitForResponse((r) => r.url().endsWith('/history'), { timeout: TIMEOUT_MS });
      await page.waitForTimeout(200);
      for (const c of CHARTS) {
        await waitText(page, `#${c} svg text.none`, (t) => t === 'no data yet', '"no data yet"');
        const label = await page.getAttribute(`#${c} svg`, 'aria-label');
        assert(label && label.endsWith('no data yet'), `${c}: aria-label ${JSON.stringify(label)}`);
        assert(await page.locator(`#${c} svg [data-series]`).count() === 0, `${c} draws a series without data`);
      }
      mock.state.history = 'short';
    });

    await step('mock, a few seconds after the start: every chart draws them on a minute-wide axis', async () => {
      const { drawn, body } = await chartsAgree(page, historyBodies, (b) => b.at.length < 10, HISTORY_TIMEOUT_MS, 'a short history');
      assert(body.at.length === 4, `the short history has ${body.at.length} seconds`);
      assert(drawn.age && drawn.age.points === 3, `data age drew ${JSON.stringify(drawn.age)}, want 3 points (the first second has none)`);
      assert(drawn.syncDots === 1 && drawn.syncs.applied === 1, `sync dots: ${drawn.syncDots}`);
      assert(drawn.breaker.closed === 4, `breaker closed for ${drawn.breaker.closed} s, want 4`);
      await waitText(page, '#history-span', (t) => t.endsWith('(1m)'), 'a span of one minute');
      const ticks = await page.locator('#chart-reads svg text').allTextContents();
      assert(ticks.filter((t) => /^\d\d:\d\d:\d\d$/.test(t)).length >= 3, `the time axis has too few ticks: ${JSON.stringify(ticks)}`);
      const bad = await badAttributes(page);
      assert(bad.length === 0, `NaN in the SVG: ${bad.join(' ')}`);
      mock.state.history = 'hour';
    });
  }

  await step('the charts of the last hour draw every series, and their totals are the sums of GET history', async () => {
    // Against the mock, the hour (not the short history drawn before it).
    const { drawn, body } = await chartsAgree(page, historyBodies, (b) => !mock || b.at.length === 3600,
      HISTORY_TIMEOUT_MS, mock ? "the mock's hour" : 'a history answer');
    for (const o of READ_OUTCOMES) {
      assert(await page.locator(`#chart-reads svg path[data-series="${o}"]`).count() === 1, `no reads series ${o}`);
      assert(await page.locator(`#chart-reads .legend [data-legend="${o}"]`).count() === 1, `no legend entry for ${o}`);
    }
    for (const b of BREAKER_STATES) {
      assert(await page.locator(`#chart-breaker svg g[data-series="${b}"]`).count() === 1, `no breaker series ${b}`);
    }
    assert(drawn.age, 'no data age line');
    assert(/\d/.test(await page.textContent('#chart-reads svg text.ymax')), 'the reads y-axis max is not labelled');
    const sec = body.at.length;
    console.log(`     ${sec} s drawn; reads ${JSON.stringify(drawn.reads)}; breaker ${JSON.stringify(drawn.breaker)}; syncs ${JSON.stringify(drawn.syncs)}`);
    if (mock) {
      // The mock's hour ends in an outage: every kind of read, the breaker
      // open, failed syncs, and fresh_for marked from GET status.
      for (const o of READ_OUTCOMES) assert(drawn.reads[o] > 0, `the mock's hour has ${o} reads, the chart drew none`);
      assert(drawn.breaker.open > 0 && drawn.breaker.half_open > 0, 'the open breaker is not drawn');
      assert(drawn.syncs.failed > 0 && drawn.syncs.held > 0, 'the failed and held syncs are not drawn');
      assert(drawn.freshFor === 90, `fresh_for marked at ${drawn.freshFor}, want 90`);
      assert(sec === 3600, `the mock's hour has ${sec} seconds`);
    }
    const bad = await badAttributes(page);
    assert(bad.length === 0, `NaN in the SVG: ${bad.join(' ')}`);
    for (const c of ['chart-reads', 'chart-age', 'chart-syncs']) {
      const labels = await page.locator(`#${c} svg text.ymax, #${c} svg text.ymid`).allTextContents();
      assert(labels.length === 2 && labels.every((t) => /\d/.test(t)), `${c}: y-axis labels ${JSON.stringify(labels)}`);
    }
  });

  if (mock) {
    await step('mock: the outage is drawn where it happened, at the end of the hour', async () => {
      const p = await outagePlacement(page);
      const width = p.right - p.left;
      assert(p.open.length > 0 && p.closed.length > 0, `breaker runs: ${p.open.length} open, ${p.closed.length} closed`);
      const openFrom = Math.min(...p.open.map((r) => r[0]));
      const closedTo = Math.max(...p.closed.map((r) => r[1]));
      // The mock's outage is the last OUTAGE_SECONDS (7 min) of the hour.
      assert(openFrom > p.left + 0.85 * width && openFrom < p.left + 0.93 * width,
        `the breaker opens at x ${openFrom}, not near 7 min before the end (${p.left}–${p.right})`);
      assert(closedTo <= openFrom + 1, `the breaker is drawn closed (to x ${closedTo}) after it opened (x ${openFrom})`);
      assert(p.stale.length > 0, 'no stale reads are filled in the reads chart');
      assert(Math.min(...p.stale) >= openFrom - 2, `stale reads drawn from x ${Math.min(...p.stale)}, before the breaker opened (x ${openFrom})`);
      assert(Math.max(...p.stale) >= p.right - 4, `stale reads end at x ${Math.max(...p.stale)}, not at the end of the hour (${p.right})`);
      assert(Math.min(...p.hit) < p.left + 5 && p.hit.some((x) => x < openFrom - 10), 'no fresh reads before the outage');
      console.log(`     breaker open from x ${openFrom} of ${p.left}–${p.right}; stale reads from x ${Math.min(...p.stale)}`);
    });
  }

  await step('the charts are redrawn as new seconds arrive', async () => {
    const before = Number(await page.evaluate(() => document.getElementById('history').dataset.at));
    try {
      await page.waitForFunction((b) => Number(document.getElementById('history').dataset.at) > b, before, { timeout: HISTORY_TIMEOUT_MS });
    } catch {
      throw new Error(`the charts still end at ${before} after ${HISTORY_TIMEOUT_MS / 1000}s`);
    }
    await chartsAgree(page, historyBodies, (b) => b.at[b.at.length - 1] > before);
  });

  if (mock) {
    await step('mock: a broken GET history is reported beside the charts and the rest of the page keeps working', async () => {
      for (const [mode, expect] of [['truncated', 'JSON'], ['malformed', 'values for'], ['error', '500'], ['hang', 'no answer within']]) {
        mock.state.history = mode;
        // A hung request is given up after 10 s, one poll (5 s) after the last.
        await waitText(page, '#history-note', (t, e) => t.startsWith('history unavailable') && t.includes(e),
          `"history unavailable" naming ${expect}`, expect, mode === 'hang' ? 25_000 : TIMEOUT_MS);
        assert(await page.locator('#history.outdated').count() === 1, `${mode}: the last good charts are not marked outdated`);
        for (const c of CHARTS) assert(await page.locator(`#${c} svg [data-series]`).count() > 0, `${mode}: ${c} lost its drawing`);
      }
      // The status poll goes on: a change to the status still shows.
      mock.state.mirror.entities = 5001;
      await waitText(page, '#entities', (t) => t === '5,001', '5,001');
      mock.state.mirror.entities = 5000;
      mock.state.history = 'hour';
      await waitText(page, '#history-note', (t) => t === '', 'no note once history answers again', null);
      await chartsAgree(page, historyBodies);
    });
  }

  await step('a wrong token is reported as 401 and changes nothing', async () => {
    const modeBefore = (await page.textContent('#breaker-mode')).trim();
    await page.fill('#token', 'not-the-admin-token');
    await page.selectOption('#breaker-mode-select', 'open');
    await page.fill('#breaker-reason-input', 'must be refused');
    await page.click('#breaker-apply');
    await waitText(page, '#message', (t) => t.includes('401'), 'a message naming 401');
    assert(await page.locator('#message.bad').count() === 1, '#message is not styled as an error');
    await page.waitForTimeout(2500); // one poll later the page must still show the old mode
    const modeAfter = (await page.textContent('#breaker-mode')).trim();
    assert(modeAfter === modeBefore, `mode changed from ${modeBefore} to ${modeAfter} with a wrong token`);
    assert(await page.locator('#audit tbody tr', { hasText: 'must be refused' }).count() === 0, 'refused change was audited');
  });

  await step('the token is kept in sessionStorage', async () => {
    await page.fill('#token', token);
    const stored = await page.evaluate(() => Object.values(sessionStorage));
    assert(stored.includes(token), 'token not found in sessionStorage');
  });

  await step('breaker mode open with a reason shows mode open and the audit entry', async () => {
    await page.selectOption('#breaker-mode-select', 'open');
    await page.fill('#breaker-reason-input', reason);
    await page.fill('#breaker-for', '10m');
    await page.click('#breaker-apply');
    await waitText(page, '#message', (t) => t.startsWith('Done'), 'a success message');
    await waitText(page, '#breaker-mode', (t) => t === 'open', 'open');
    await waitText(page, '#breaker-override', (t) => t === 'forced open', 'forced open');
    assert(await page.locator('#breaker-override').isVisible(), 'forced-open badge hidden');
    await waitText(page, '#audit', (t, r) => t.includes(r), `an audit row with reason "${reason}"`, reason);
    const row = page.locator('#audit tbody tr', { hasText: reason }).first();
    const cells = await row.locator('td').allTextContents();
    assert(cells[2] === 'breaker mode' && cells[4] === 'open', `audit row reads ${JSON.stringify(cells)}`);
    const first = await page.locator('#audit tbody tr').first().locator('td').allTextContents();
    // The sidecar appends the time limit to the reason: "<reason> (for 10m)".
    assert(first[5].startsWith(reason), `newest audit row is not first: ${JSON.stringify(first)}`);
    assert(first[1] === 'status-page', `the audit names the status page as the actor: ${JSON.stringify(first)}`);
    await page.screenshot({ path: screenshot.replace(/(\.png)?$/, '-open.png'), fullPage: true });
  });

  await step('the token survives a reload of the tab', async () => {
    await page.reload({ waitUntil: 'load' });
    assert(await page.inputValue('#token') === token, 'token field empty after reload');
    await waitText(page, '#breaker-mode', (t) => t === 'open', 'open');
  });

  await step('breaker mode back to auto', async () => {
    await page.selectOption('#breaker-mode-select', 'auto');
    await page.fill('#breaker-reason-input', 'status page test done');
    await page.fill('#breaker-for', '');
    await page.click('#breaker-apply');
    await waitText(page, '#breaker-mode', (t) => t === 'auto', 'auto');
    await page.waitForFunction(() => document.getElementById('breaker-override').hidden, null, { timeout: TIMEOUT_MS })
      .catch(() => { throw new Error('forced badge still shown in mode auto'); });
  });

  await step('stale policy refuse, then serve', async () => {
    await page.selectOption('#stale-select', 'refuse');
    await page.click('#stale-apply');
    await waitText(page, '#stale-policy', (t) => t === 'refuse', 'refuse');
    await waitText(page, '#audit', (t) => t.includes('stale policy'), 'a stale policy audit row');
    await page.selectOption('#stale-select', 'serve');
    await page.click('#stale-apply');
    await waitText(page, '#stale-policy', (t) => t === 'serve', 'serve');
  });

  if (mock) {
    await step('mock outage: breaker open, failed sync, held deletions and upstream error are shown', async () => {
      outage(mock.state);
      await waitText(page, '#breaker-state', (t) => t === 'open', 'open');
      await waitText(page, '#last-sync', (t) => t === 'failed', 'failed');
      await waitText(page, '#held-deletions', (t) => t === '4,000 of 5,000 (80%)', '4,000 of 5,000 (80%)');
      await waitText(page, '#upstream-error', (t) => t.includes('refused'), 'the last upstream error');
      await waitText(page, '#upstream-chain', (t) => t.includes('catalog-cache tier that calls its data STALE') && t.includes('tier-eu; hit'), 'the tier chain, stale');
      await waitText(page, '#audit', (t) => t.includes('5 consecutive failures'), 'the breaker transition in the audit');
      assert(await page.locator('#held-deletions.bad').count() === 1, 'held deletions not styled as an error');
      await page.screenshot({ path: screenshot.replace(/(\.png)?$/, '-outage.png'), fullPage: true });
    });
  }

  if (!mock && !(controlUrl && proxyUrl)) {
    console.log('skip the outage steps: CONTROL_URL and PROXY_URL are needed to make the upstream refuse and to read through the sidecar');
  } else if (!mock) {
    await step('real outage: the upstream refuses, reads turn stale, and the charts show stale reads and the breaker open', async () => {
      // Entities to read, while the upstream still answers.
      const list = await fetch(`${proxyUrl}/entities/by-query?limit=20`).then((r) => r.json());
      const names = (list.items || []).map((e) => `${e.kind}/${e.metadata.namespace || 'default'}/${e.metadata.name}`);
      assert(names.length > 0, `no entities from ${proxyUrl}/entities/by-query`);
      const from = Math.floor(Date.now() / 1000);
      let reading = true;
      let reads = 0;
      const statuses = {};
      const reader = (async () => {
        for (let i = 0; reading && i < 2000; i += 1) {
          const r = await fetch(`${proxyUrl}/entities/by-name/${names[i % names.length]}`).catch(() => null);
          if (r) { statuses[r.status] = (statuses[r.status] || 0) + 1; await r.arrayBuffer(); }
          reads += 1;
          await new Promise((res) => setTimeout(res, 100));
        }
      })();
      try {
        await control('PUT', { refuse: true });
        const since = (body, pred) => body.at.some((t, i) => t >= from && pred(i));
        const { drawn } = await chartsAgree(page, historyBodies,
          (b) => since(b, (i) => b.reads.stale[i] > 0) && since(b, (i) => b.breaker[i] === 'open'),
          OUTAGE_TIMEOUT_MS, 'an answer with stale reads and the breaker open after the fault');
        assert(drawn.reads.stale > 0 && drawn.breaker.open > 0, 'stale reads or the open breaker not drawn');
        const label = await page.getAttribute('#chart-reads svg', 'aria-label');
        assert(/stale [1-9]/.test(label), `the reads chart's label does not name stale reads: ${label}`);
        console.log(`     ${reads} reads through the sidecar (statuses ${JSON.stringify(statuses)}); drawn: reads ${JSON.stringify(drawn.reads)}, breaker ${JSON.stringify(drawn.breaker)}, syncs ${JSON.stringify(drawn.syncs)}`);
        await page.screenshot({ path: screenshot.replace(/(\.png)?$/, '-outage.png'), fullPage: true });
      } finally {
        reading = false;
        await reader;
        await control('DELETE');
      }
    });
  }

  await step('no script errors and no request leaves the admin listener', async () => {
    assert(pageErrors.length === 0, `page errors: ${pageErrors.join('; ')}`);
    assert(externalRequests.length === 0, `external requests: ${externalRequests.join(', ')}`);
  });

  await step(`screenshot to ${screenshot}`, async () => {
    await page.screenshot({ path: screenshot, fullPage: true });
  });
} catch {
  exitCode = 1;
} finally {
  await browser.close();
  if (mock) await mock.close();
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(exitCode || (failed ? 1 : 0));

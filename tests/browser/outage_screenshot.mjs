// Makes tests/browser/status-page-outage.png: the status page of a real sidecar whose
// history holds a few minutes that end in an upstream outage. It reads
// through the sidecar for NORMAL_S seconds (mostly known entities, some
// locations, which are read through and not mirrored, the odd malformed
// request), then has the demo catalog refuse connections for OUTAGE_S
// seconds while the reads go on (stale reads, refusals of locations never
// stored, the breaker open, failed syncs),
// captures the page's cards and charts, and clears the fault. Start the
// sidecar fresh, so the history is the run's alone, e.g. (from the repo root):
//
//   cargo build --workspace --bins
//   target/debug/catalog-chaos fake-catalog --listen 127.0.0.1:7007 --control 127.0.0.1:7017 --entities 500 &
//   CATALOG_CACHE_UPSTREAM_URL=http://127.0.0.1:7007/api/catalog CATALOG_CACHE_MIRROR_PATH=/tmp/shot/m.db \
//   CATALOG_CACHE_ADMIN_TOKEN_FILE=/tmp/shot/admin.token CATALOG_CACHE_FRESHNESS_FRESH_FOR=3s \
//   CATALOG_CACHE_MIRROR_SYNC_INTERVAL=5s target/debug/catalog-cache serve &
//   cd tests/browser && ADMIN_URL=http://127.0.0.1:7071 CONTROL_URL=http://127.0.0.1:7017 \
//     PROXY_URL=http://127.0.0.1:7070/api/catalog node outage_screenshot.mjs
//
// (fresh_for shorter than the sync interval, so some reads are revalidated.)
// Or, with the same URLs, the demo (fresh_for 15s, a sync every 10s):
//
//   target/debug/catalog-cache demo --entities 500 --data-dir /tmp/shot &
//
//   OUT                 the PNG (default tests/browser/status-page-outage.png)
//   NORMAL_S, OUTAGE_S  seconds of each phase (default 75 and 75)
//   CHROMIUM            browser binary (default /usr/bin/chromium)
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const need = (name) => {
  const v = (process.env[name] || '').replace(/\/+$/, '');
  if (!v) { console.error(`${name} is required`); process.exit(2); }
  return v;
};
const adminUrl = need('ADMIN_URL');
const controlUrl = need('CONTROL_URL');
const proxyUrl = need('PROXY_URL');
const out = process.env.OUT || path.join(here, 'status-page-outage.png');
const normalS = Number(process.env.NORMAL_S || 75);
const outageS = Number(process.env.OUTAGE_S || 75);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function faults(method, body) {
  const r = await fetch(`${controlUrl}/faults`, {
    method,
    headers: body ? { 'Content-Type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!r.ok) throw new Error(`${method} ${controlUrl}/faults answered ${r.status}`);
}

const list = await fetch(`${proxyUrl}/entities/by-query?limit=60`).then((r) => r.json());
const names = list.items.map((e) => `${e.kind}/${e.metadata.namespace || 'default'}/${e.metadata.name}`);
if (!names.length) throw new Error('no entities to read');

// Reads until stopped, at a rate that wanders between about 6 and 14 a second.
let reading = true;
const statuses = {};
const reader = (async () => {
  for (let i = 0; reading && i < 100_000; i += 1) {
    const roll = (i * 7919) % 100;
    const target = roll < 4 ? `/locations/never-seen-${i}`
      : roll < 5 ? '/entities/by-uid/%zz'
        : `/entities/by-name/${names[(i * 31) % names.length]}`;
    const r = await fetch(`${proxyUrl}${target}`).catch(() => null);
    if (r) { statuses[r.status] = (statuses[r.status] || 0) + 1; await r.arrayBuffer(); }
    await sleep(1000 / (10 + 4 * Math.sin(Date.now() / 9000)));
  }
})();

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});
try {
  console.log(`reading for ${normalS} s`);
  await sleep(normalS * 1000);
  console.log(`the upstream refuses connections for ${outageS} s`);
  await faults('PUT', { refuse: true });
  // As wide as the page's main column, so the capture has no empty margin.
  const page = await browser.newPage({ viewport: { width: 1120, height: 900 }, deviceScaleFactor: 1 });
  await sleep(Math.max(0, outageS * 1000 - 9000));
  await page.goto(`${adminUrl}/`, { waitUntil: 'load' });
  await page.waitForFunction(() => document.getElementById('history').dataset.at
    && document.querySelector('#chart-breaker svg [data-series="open"] rect'), null, { timeout: 20_000 });
  await sleep(Math.max(0, 9000 - 2000));
  const box = await page.locator('#history').boundingBox();
  await page.screenshot({ path: out, fullPage: true, clip: { x: 0, y: 0, width: 1120, height: Math.ceil(box.y + box.height + 12) } });
  console.log(`wrote ${out}; answers by status: ${JSON.stringify(statuses)}`);
} finally {
  reading = false;
  await reader;
  await faults('DELETE');
  await browser.close();
}

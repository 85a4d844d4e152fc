// Drives the admin status page (GET /) in a real headless Chromium the way an
// operator would: reads the breaker state, enters the admin token, opens the
// breaker with a reason and sees it in the audit table, sets it back to auto,
// flips the stale policy to refuse and back, and checks that a wrong token is
// reported as a 401. Exits non-zero on the first failure.
//
//   ADMIN_URL    admin listener, e.g. http://127.0.0.1:7071 (unset: start mock_admin.mjs)
//   ADMIN_TOKEN  the admin token (required with ADMIN_URL)
//   SCREENSHOT   where to write a PNG of the page (default in the temp dir);
//                -open.png and (mock only) -outage.png are written beside it
//   CHROMIUM     browser binary (default /usr/bin/chromium)
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { startMock, outage } from './mock_admin.mjs';

const TIMEOUT_MS = 10_000;
const screenshot = process.env.SCREENSHOT || path.join(os.tmpdir(), 'catalog-cache-status-page.png');

let mock = null;
let adminUrl = process.env.ADMIN_URL;
let token = process.env.ADMIN_TOKEN;
if (!adminUrl) {
  token = token || 'test-admin-token';
  mock = await startMock({ token });
  adminUrl = mock.url;
  console.log(`no ADMIN_URL: testing against the mock at ${adminUrl}`);
} else if (!token) {
  console.error('ADMIN_TOKEN is required when ADMIN_URL is set');
  process.exit(2);
}
adminUrl = adminUrl.replace(/\/+$/, '');

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
async function waitText(page, selector, pred, what, arg = null) {
  try {
    await page.waitForFunction(
      ([sel, src, a]) => {
        const el = document.querySelector(sel);
        // eslint-disable-next-line no-new-func
        return el && new Function('t', 'a', `return (${src})(t, a)`)(el.textContent.trim(), a);
      },
      [selector, pred.toString(), arg],
      { timeout: TIMEOUT_MS },
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

const reason = `status page test ${new Date().toISOString()}`;
let exitCode = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  const externalRequests = [];
  page.on('request', (r) => { if (!r.url().startsWith(adminUrl)) externalRequests.push(r.url()); });

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
      await waitText(page, '#audit', (t) => t.includes('5 consecutive failures'), 'the breaker transition in the audit');
      assert(await page.locator('#held-deletions.bad').count() === 1, 'held deletions not styled as an error');
      await page.screenshot({ path: screenshot.replace(/(\.png)?$/, '-outage.png'), fullPage: true });
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

/**
 * The web dashboard (`ferry ui`), for real: headless Chromium from Debian's package
 * drives it through puppeteer-core against a lab. It opens a guest's console and types
 * in it, starts a live migration with a click and reads the chart and the report, sees
 * the console follow the guest to its new host, and evacuates a host. Screenshots are
 * kept in test-artifacts/ui/.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { type ChildProcess } from 'node:child_process';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import https from 'node:https';
import { ok, ferry, labUp, labDown, createGuest, labState, startUi } from '../helpers.ts';

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p));
const SHOTS = path.resolve(import.meta.dirname, '..', '..', 'test-artifacts', 'ui');

describe('web dashboard (lab, headless Chromium)', () => {
  let ui: ChildProcess | undefined;
  let browser: Browser | undefined;
  let page: Page;
  let url = '';
  const shot = async (name: string): Promise<void> => {
    await page.screenshot({ path: path.join(SHOTS, `${name}.png`) as `${string}.png`, fullPage: true });
  };
  const text = (): Promise<string> =>
    page.evaluate(() => (window as unknown as { ferry: { consoleText: () => string } }).ferry.consoleText());
  const waitText = async (re: RegExp, ms = 30000): Promise<void> => {
    const t0 = Date.now();
    while (!re.test(await text())) {
      if (Date.now() - t0 > ms) assert.fail(`console never showed ${re}: ${(await text()).slice(-400)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };

  before(async () => {
    assert.ok(CHROMIUM, "Debian's chromium package is installed (scripts/install-packages.sh)");
    fs.mkdirSync(SHOTS, { recursive: true });
    await labUp(['--hosts', '2', '--host-memory', '1024']);
    await createGuest('linux', 'web', 'host1');
    ({ child: ui, url } = await startUi(['--listen', '127.0.0.1:0']));
    browser = await puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
    });
    page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 1400 });
  });
  after(async () => {
    await browser?.close().catch(() => undefined);
    if (ui?.pid && ui.exitCode === null) {
      ui.kill('SIGTERM');
      await new Promise((r) => ui!.once('exit', r));
    }
    await labDown();
  });

  test('without its token the dashboard answers 403', async () => {
    const r = await fetch(url.replace(/\?token=.*/, 'api/state'));
    assert.equal(r.status, 403);
    const bad = await fetch(url.replace(/token=[^&]+/, 'token=nope'));
    assert.equal(bad.status, 403);
  });

  test("served elsewhere: HTTPS, and only an administrator's certificate gets in", async () => {
    const s = labState();
    const tlsDir = s.hosts[0].tlsDir;
    const { child: srv, url: httpsUrl } = await startUi(['--listen', '127.0.0.1:0', '--tls-dir', tlsDir]);
    try {
      assert.match(httpsUrl, /^https:\/\/127\.0\.0\.1:\d+\/$/);
      const get = (certDir?: string): Promise<number | string> =>
        new Promise((resolve) => {
          const f = (n: string): Buffer => fs.readFileSync(path.join(certDir!, n));
          const req = https.get(
            `${httpsUrl}api/state`,
            {
              ca: fs.readFileSync(path.join(tlsDir, 'ca-cert.pem')),
              checkServerIdentity: () => undefined,
              ...(certDir ? { cert: f('client-cert.pem'), key: f('client-key.pem') } : {}),
            },
            (res) => {
              res.resume();
              resolve(res.statusCode ?? 0);
            },
          );
          req.on('error', (e) => resolve((e as NodeJS.ErrnoException).code ?? e.message));
        });
      assert.equal(await get(s.adminTlsDir), 200, 'an administrator');
      assert.equal(await get(s.hosts[1].tlsDir), 403, 'a host certificate is not an administrator');
      assert.notEqual(await get(), 200, 'no certificate: no page');
    } finally {
      srv.kill('SIGTERM');
    }
    // Not on loopback without TLS: refused at start.
    const plain = await ferry(['ui', '--listen', '198.19.0.2:0']);
    assert.equal(plain.code, 2, plain.stdout + plain.stderr);
    assert.match(plain.stderr + plain.stdout, /needs HTTPS: give --tls-dir/);
  });

  test("hosts and domains; the console takes keys and shows the guest's answer", async () => {
    await page.goto(url);
    await page.waitForSelector('tr[data-domain="web"] td.host');
    assert.equal(await page.$eval('tr[data-domain="web"] td.host', (e) => e.textContent), 'host1');
    assert.equal(await page.$eval('tr[data-domain="web"] td.state', (e) => e.textContent), 'running');
    assert.deepEqual(await page.$$eval('#hosts tbody tr', (rows) => rows.map((r) => r.getAttribute('data-host'))), ['host1', 'host2']);
    await page.click('tr[data-domain="web"] button.console');
    await page.waitForSelector('#terminal .xterm');
    await page.click('#terminal');
    await page.keyboard.type('echo ui-$((6*7))\n');
    await waitText(/^ui-42$/m);
    await shot('1-console');
  });

  test('a live migration with a click: the chart fills, the report shows the pause, the console follows', async () => {
    await page.select('tr[data-domain="web"] select.dest', 'host2');
    await page.click('tr[data-domain="web"] button.migrate');
    await page.waitForFunction(
      () =>
        (window as unknown as { ferry: { reports: Map<string, { outcome: string }> } }).ferry.reports.get('web')?.outcome === 'succeeded',
      { timeout: 60000 },
    );
    const chart = await page.evaluate(() => {
      const c = (window as unknown as { ferry: { charts: Map<string, { data: number[][] }> } }).ferry.charts.get('web')!;
      return { points: c.data[0].length, rates: c.data[1] };
    });
    assert.ok(chart.points >= 1, `${chart.points} points on the chart`);
    assert.ok(
      chart.rates.some((r) => r > 0),
      `throughput drawn: ${chart.rates.join(',')}`,
    );
    assert.ok(await page.$('[data-migration="web"] canvas'), 'uPlot drew a canvas');
    assert.match(await page.$eval('[data-migration="web"] .pause', (e) => e.textContent ?? ''), /^\d+ ms$/);
    assert.match(await page.$eval('[data-migration="web"] .guest-downtime', (e) => e.textContent ?? ''), /^\d+(\.\d+)? ms$/);
    await page.waitForFunction(() => document.querySelector('tr[data-domain="web"] td.host')?.textContent === 'host2', { timeout: 10000 });
    await waitText(/moved from host1 to host2; following it/);
    // Typed at once: keys that arrive while the console re-attaches on host2 are kept for it.
    await page.click('#terminal');
    await page.keyboard.type('echo after-$((7*6))\n');
    await waitText(/^after-42$/m);
    assert.doesNotMatch(await text(), /not found|No console open/);
    assert.equal(await page.evaluate(() => (window as unknown as { ferry: { consoleHost: string } }).ferry.consoleHost), 'host2');
    await shot('2-migrated');
  });

  test('the evacuation view: host2 empties into host1, line by line', async () => {
    await page.click('tr[data-host="host2"] button.evacuate');
    await page.waitForFunction(
      () => (window as unknown as { ferry: { evacuation: { done?: string } | null } }).ferry.evacuation?.done === 'done',
      { timeout: 90000 },
    );
    assert.equal(await page.$eval('#evacuation tr[data-domain="web"] td.state', (e) => e.textContent), 'moved');
    await page.waitForFunction(() => document.querySelector('tr[data-host="host2"] td.maintenance')?.textContent?.startsWith('on since'), {
      timeout: 10000,
    });
    assert.equal((await ok(['-H', 'host1', 'info', 'web', '--json'])).state, 'running');
    await shot('3-evacuated');
  });
});

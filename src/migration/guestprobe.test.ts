/**
 * The probe's resolution holds through a long pause. A loopback "guest" (a small
 * python3 listener) answers for 300 ms, then stops accepting for 700 ms: once its
 * accept queue is full, Linux drops SYNs, as a paused guest's tap does; then it closes
 * and every SYN is answered (RST) again.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { GuestProbe } from './guestprobe.ts';

const GUEST = `
import socket, time, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
s.settimeout(0.01)
t = time.monotonic()
while time.monotonic() - t < 0.3:
    try: s.accept()[0].close()
    except socket.timeout: pass
print('paused', flush=True)
time.sleep(0.7)
s.close()
print('resumed', flush=True)
time.sleep(1)
`;

test('a 700 ms pause is measured to within a few ms, and waitForReplyAfter sees the first answer after it', async () => {
  const py = spawn('python3', ['-c', GUEST], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  const said = (w: string): Promise<void> =>
    new Promise((r) => {
      const f = (): void => {
        if (out.includes(w)) {
          py.stdout.off('data', f);
          r();
        }
      };
      py.stdout.on('data', (d) => {
        out += d;
        f();
      });
      f();
    });
  try {
    await said('\n');
    const port = Number(out.split('\n')[0]);
    const probe = new GuestProbe('127.0.0.1', port, 1, 200);
    probe.start();
    await said('resumed');
    const resumedAt = performance.now();
    assert.equal(await probe.waitForReplyAfter(resumedAt, 3000), true, 'answered after the pause');
    await new Promise((r) => setTimeout(r, 50));
    const r = await probe.stop();
    assert.ok(r.replies > 50, `replies: ${r.replies}`);
    assert.ok(r.longestGapMs >= 600 && r.longestGapMs < 900, `measured ${r.longestGapMs} ms for a ~700 ms pause`);
  } finally {
    py.kill();
  }
});

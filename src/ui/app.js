// ferry's dashboard (served by `ferry ui`, src/cli/ui.ts). Plain browser JavaScript:
// the state comes from /api/state, live changes from the /api/events stream; charts are
// uPlot, the console is xterm.js. `window.ferry` exposes what the page shows, for tests.
'use strict';

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs))
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
};
const mib = (b) => `${(b / 1048576).toFixed(0)} MiB`;
const post = async (url, body) => {
  const r = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const v = await r.json();
  if (!r.ok) throw new Error(v.error ? `${v.error.code}: ${v.error.message}` : `HTTP ${r.status}`);
  return v;
};

const ferry = {
  state: null,
  migrations: new Map(),
  charts: new Map(),
  reports: new Map(),
  term: null,
  consoleHost: null,
  evacuation: null,
};
window.ferry = ferry;

async function refresh() {
  const r = await fetch('/api/state');
  ferry.state = await r.json();
  render();
}
let refreshTimer = null;
const refreshSoon = () => {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => void refresh(), 150);
};

/** Each host's line of moves: running ones hold a slot; queued ones wait, evacuations first, with an ETA. */
function renderQueue(queue) {
  const eta = (ms) => (ms === null ? '?' : `${Math.ceil(ms / 1000)} s`);
  $('#queue tbody').replaceChildren(
    ...queue.map((q) =>
      el(
        'tr',
        { 'data-queued': q.domain },
        el('td', {}, q.host),
        el('td', {}, q.domain),
        el('td', {}, q.dest),
        el('td', {}, q.priority),
        el('td', { class: 'state' }, q.state === 'queued' ? `queued #${q.position}` : 'running'),
        el('td', {}, eta(q.etaMs)),
      ),
    ),
  );
  $('#queue-none').hidden = queue.length > 0;
  $('#queue').hidden = queue.length === 0;
}

function render() {
  const { hosts, domains, mode, quorate, from, queue } = ferry.state;
  renderQueue(queue ?? []);
  // Cluster mode: the view is one ferryd's etcd watch; said so, and when that host cannot reach etcd.
  $('#mode').textContent =
    mode === 'cluster' ? `cluster (from ${from}'s etcd watch${quorate ? '' : ': NO QUORUM, may be stale'})` : 'standalone';
  $('#mode').className = mode === 'cluster' && !quorate ? 'bad' : '';
  const hb = $('#hosts tbody');
  hb.replaceChildren(
    ...hosts.map((h) =>
      h.error
        ? el('tr', { 'data-host': h.name }, el('td', {}, h.name), el('td', { colspan: 5, class: 'bad' }, h.error))
        : el(
            'tr',
            { 'data-host': h.name },
            el('td', {}, h.name),
            el('td', {}, h.qemuVersion),
            el('td', {}, `${h.memory.usedMiB} / ${h.memory.offeredMiB} MiB (${h.memory.freeMiB} free)`),
            el('td', {}, String(domains.filter((d) => d.host === h.name && d.state !== 'shutoff').length)),
            el('td', { class: 'maintenance' }, h.maintenance.on ? `on since ${h.maintenance.since}` : 'off'),
            el('td', {}, el('button', { class: 'evacuate', onclick: () => evacuate(h.name) }, 'Evacuate')),
          ),
    ),
  );
  const names = hosts.filter((h) => !h.error).map((h) => h.name);
  const db = $('#domains tbody');
  db.replaceChildren(
    ...domains.map((d) => {
      const sel = el('select', { class: 'dest' }, ...names.filter((n) => n !== d.host).map((n) => el('option', { value: n }, n)));
      const running = d.state === 'running' || d.state === 'paused';
      return el(
        'tr',
        { 'data-domain': d.name },
        el('td', {}, d.name),
        el('td', { class: 'host' }, d.host),
        el('td', { class: 'state' }, d.state),
        el('td', { class: 'ha' }, d.ha ? `prio ${d.ha.priority}` : '-'),
        el('td', {}, `${d.memoryMiB} MiB`),
        el('td', {}, sel),
        el(
          'td',
          {},
          el('button', { class: 'migrate', ...(running ? {} : { disabled: '' }), onclick: () => migrate(d, sel.value) }, 'Migrate'),
        ),
        el(
          'td',
          {},
          el('button', { class: 'console', ...(running ? {} : { disabled: '' }), onclick: () => openConsole(d.name, d.host) }, 'Console'),
        ),
      );
    }),
  );
}

// ---- migrations: one panel per job, a uPlot chart of the stream over time ----

function panel(domain) {
  let m = ferry.migrations.get(domain);
  if (m) return m;
  $('#migrations .none')?.remove();
  const facts = el('div', { class: 'facts' });
  const bar = el('div', { class: 'bar' }, el('div'));
  const chartBox = el('div', { class: 'chart' });
  const result = el('div', { class: 'result' });
  const box = el('div', { class: 'migration', 'data-migration': domain }, el('b', {}, domain), bar, facts, chartBox, result);
  $('#migrations').prepend(box);
  const data = [[], [], []];
  const chart = new uPlot(
    {
      width: 860,
      height: 220,
      title: `${domain}: stream`,
      scales: { x: { time: false }, mib: {} },
      axes: [{ label: 's' }, { label: 'MB/s' }, { side: 1, scale: 'mib', label: 'MiB left', grid: { show: false } }],
      series: [
        { label: 's' },
        { label: 'throughput MB/s', stroke: '#2f7bbf', width: 2 },
        { label: 'remaining MiB', stroke: '#c2571a', scale: 'mib', width: 2 },
      ],
    },
    data,
    chartBox,
  );
  m = { box, facts, bar, result, data, chart, t0: performance.now() };
  ferry.migrations.set(domain, m);
  ferry.charts.set(domain, { data, chart });
  return m;
}

function onProgress(p) {
  const m = panel(p.domain);
  if (m.jobId !== p.jobId) {
    // Another move of the same domain: the panel starts over.
    m.jobId = p.jobId;
    for (const a of m.data) a.length = 0;
    m.t0 = performance.now();
    m.result.replaceChildren();
  }
  const t = (performance.now() - m.t0) / 1000;
  m.data[0].push(+t.toFixed(2));
  m.data[1].push(+p.rateMBps.toFixed(1));
  m.data[2].push(+(p.remaining / 1048576).toFixed(1));
  m.chart.setData(m.data);
  m.bar.firstChild.style.width = `${p.percent.toFixed(1)}%`;
  m.facts.replaceChildren(
    el('span', { class: 'stage' }, el('b', {}, 'stage '), p.stage ?? `pass ${p.pass}`),
    el('span', {}, el('b', {}, 'done '), `${p.percent.toFixed(1)}%`),
    el('span', { class: 'sent' }, el('b', {}, 'RAM sent '), mib(p.transferred)),
    el('span', {}, el('b', {}, 'remaining '), mib(p.remaining)),
    el('span', {}, el('b', {}, 'rate '), `${p.rateMBps.toFixed(0)} MB/s`),
    el('span', {}, el('b', {}, 'dirty '), `${p.dirtyRate} pages/s`),
    ...(p.disk ? [el('span', {}, el('b', {}, 'disks '), `${mib(p.disk.copied)} / ${mib(p.disk.total)}`)] : []),
    el('span', {}, el('b', {}, 'ETA '), p.etaS === null ? '?' : `${p.etaS.toFixed(1)} s`),
  );
}

function onDone(r) {
  const m = panel(r.domain);
  ferry.reports.set(r.domain, r);
  m.result.replaceChildren(
    r.outcome === 'succeeded'
      ? el(
          'div',
          { class: 'ok' },
          `${r.source} → ${r.destination}: ${r.totalMs} ms in total; pause `,
          el('b', { class: 'pause' }, `${r.pauseMs ?? '?'} ms`),
          '; guest-perceived downtime ',
          el('b', { class: 'guest-downtime' }, `${r.guestDowntimeMs ?? '?'} ms`),
          `; ${r.strategy ?? r.mode}`,
        )
      : el('div', { class: 'bad' }, `${r.outcome}: ${r.error ? `${r.error.code}: ${r.error.message}` : ''}`),
  );
  refreshSoon();
}

async function migrate(d, to) {
  if (!to) return;
  panel(d.name).result.replaceChildren(el('span', {}, `moving ${d.name} from ${d.host} to ${to}…`));
  try {
    await post('/api/migrate', { domain: d.name, from: d.host, to, live: true });
  } catch (e) {
    onDone({ domain: d.name, outcome: 'failed', error: { code: 'UI', message: e.message } });
  }
}

// ---- evacuation ----

async function evacuate(host) {
  $('#evacuation-section').hidden = false;
  $('#evac-title').textContent = `of ${host}`;
  try {
    await post('/api/evacuate', { host });
  } catch (e) {
    $('#evac-title').textContent = `of ${host}: ${e.message}`;
  }
}

function onEvacuation(v) {
  ferry.evacuation = v;
  $('#evacuation-section').hidden = false;
  $('#evac-title').textContent =
    `of ${v.host}${v.error ? `: ${v.error.code}: ${v.error.message}` : v.done ? `: ${v.done}` : v.etaMs ? `, ETA ${(v.etaMs / 1000).toFixed(1)} s` : ''}`;
  if (v.rows)
    $('#evacuation tbody').replaceChildren(
      ...v.rows.map((r) =>
        el(
          'tr',
          { 'data-domain': r.domain },
          el('td', {}, r.domain),
          el('td', {}, r.to ?? '-'),
          el('td', { class: 'state' }, r.state),
          el('td', {}, `${Math.round(r.percent)}%`),
          el('td', {}, r.error ? `${r.error.code}: ${r.error.message}` : r.stage || r.why),
        ),
      ),
    );
  refreshSoon();
}

// ---- console: xterm.js over /api/console (output) and /api/console/input (keys) ----

let consoleStream = null;
function openConsole(domain, host) {
  consoleStream?.close();
  $('#console-section').hidden = false;
  $('#console-title').textContent = `${domain} on ${host}`;
  if (!ferry.term) {
    ferry.term = new Terminal({ cols: 100, rows: 24, convertEol: false });
    ferry.term.open($('#terminal'));
    // One request at a time, in order: keys typed meanwhile are batched into the next.
    let typed = '';
    let sending = false;
    const flush = () => {
      if (sending || !typed) return;
      const data = typed;
      typed = '';
      sending = true;
      post('/api/console/input', { domain: ferry.consoleDomain, data })
        .catch((e) => ferry.term.write(`\r\n[${e.message}]\r\n`))
        .finally(() => {
          sending = false;
          flush();
        });
    };
    ferry.term.onData((data) => {
      typed += data;
      flush();
    });
  }
  ferry.consoleDomain = domain;
  ferry.consoleHost = host;
  const es = new EventSource(`/api/console?domain=${encodeURIComponent(domain)}&host=${encodeURIComponent(host)}`);
  consoleStream = es;
  es.addEventListener('output', (e) => ferry.term.write(Uint8Array.from(atob(JSON.parse(e.data)), (c) => c.charCodeAt(0))));
  es.addEventListener('attached', (e) => {
    ferry.consoleHost = JSON.parse(e.data).host;
    $('#console-title').textContent = `${domain} on ${ferry.consoleHost}`;
  });
  es.addEventListener('moved', (e) => {
    const m = JSON.parse(e.data);
    ferry.term.write(`\r\n[ferry: ${domain} moved from ${m.from} to ${m.to}; following it]\r\n`);
  });
  es.addEventListener('closed', (e) => {
    ferry.term.write(`\r\n[ferry: console closed: ${JSON.parse(e.data).reason}]\r\n`);
    es.close();
  });
}

/** The terminal's text, line by line (for tests and copy-paste). */
ferry.consoleText = () => {
  const b = ferry.term?.buffer.active;
  if (!b) return '';
  const out = [];
  for (let i = 0; i < b.length; i++) out.push(b.getLine(i)?.translateToString(true) ?? '');
  return out.join('\n');
};

// ---- the event stream ----

const events = new EventSource('/api/events');
events.onopen = () => {
  $('#status').textContent = 'live';
};
events.onerror = () => {
  $('#status').textContent = 'reconnecting…';
};
events.addEventListener('migration.progress', (e) => onProgress(JSON.parse(e.data)));
events.addEventListener('migration.done', (e) => onDone(JSON.parse(e.data).report));
events.addEventListener('ui.migrated', (e) => {
  const v = JSON.parse(e.data);
  if (v.report?.outcome !== 'succeeded' || !ferry.reports.has(v.domain)) onDone(v.report);
});
events.addEventListener('ui.evacuation', (e) => onEvacuation(JSON.parse(e.data)));
for (const name of ['domain.state', 'migration.phase', 'migration.queue', 'host.maintenance', 'cluster.changed'])
  events.addEventListener(name, refreshSoon);

void refresh();

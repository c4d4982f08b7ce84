// The gateway's web page: the signed-in user's clusters (every cluster for admins), a form for
// new ones generated from GET api/v1/options, actions through the same REST API the clients
// use, live events, and usage. Everything user-controlled is set as text (never as markup).
'use strict';

const POLL_MS = 2000;
const state = {
  me: null,
  options: [],
  clusters: [],
  open: new Set(), // clusters whose detail row is shown
  streams: new Map(), // cluster -> EventSource
  events: new Map(), // cluster -> events received
  lastRequests: null,
};

// -- helpers -------------------------------------------------------------------------------

/** An element with attributes (never event handlers) and children (strings become text). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) throw new Error('no inline handlers');
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const $ = (id) => document.getElementById(id);

/** One API call; an error carries the API's own message. */
async function api(method, path, body) {
  const init = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch('api/v1/' + path, init);
  let data = null;
  try { data = await r.json(); } catch (_) { /* no body */ }
  if (!r.ok) {
    let message = (data && data.error) || `${r.status} ${r.statusText}`;
    if (r.status === 401) message += ' (your session has ended: reload the page to sign in again)';
    const err = new Error(message);
    err.status = r.status;
    throw err;
  }
  return data;
}

// What the notice shows the failure of (an attempt's `what`), or null for a user's message.
let noticeFrom = null;

function notify(message, kind, from = null) {
  const n = $('notice');
  n.textContent = message;
  n.className = 'notice' + (kind === 'info' ? ' info' : '');
  n.setAttribute('role', kind === 'info' ? 'status' : 'alert');
  n.hidden = !message;
  noticeFrom = message ? from : null;
}

/** Runs a user's action, reporting its failure in the API's words; a success clears the
 *  notice. */
function attempt(what, action) {
  return run(what, action, true);
}

/** Runs a read the page repeats on its own. A failure is reported like a user's; a success
 *  clears only the failure of this same read, so the answer to what the user did (a refusal,
 *  a confirmation) stays until the user acts again, whatever the polls do meanwhile. */
function poll(what, action) {
  return run(what, action, false);
}

async function run(what, action, byUser) {
  try {
    const result = await action();
    if (byUser || noticeFrom === what) notify('');
    return result;
  } catch (e) {
    notify(`${what}: ${e.message}`, undefined, what);
    return undefined;
  }
}

function age(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function memory(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${bytes} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

function round(x, digits) {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** The gateway's address as a client gives it (this page's directory, without the slash). */
function gatewayAddress() {
  return new URL('.', window.location.href).href.replace(/\/$/, '');
}

function pyString(s) {
  return JSON.stringify(s); // a valid Python string literal for any text
}

function shellWord(s) {
  return `'${String(s).replace(/'/g, `'\\''`)}'`;
}

// -- who am I ------------------------------------------------------------------------------

async function loadMe() {
  state.me = await api('GET', 'me');
  const who = $('whoami');
  who.textContent = '';
  who.append('Signed in as ', el('strong', { text: state.me.name }));
  if (state.me.admin) who.append(' (admin)');
  if (state.me.policy) who.append(` · group policy ${state.me.policy}`);
  for (const e of document.querySelectorAll('.admin-only')) e.hidden = !state.me.admin;
  $('health').hidden = !state.me.admin;
}

// -- the new-cluster form --------------------------------------------------------------------

function optionInput(opt) {
  const id = `opt-${opt.field}`;
  const spec = opt.spec || {};
  const hint = [];
  let input;
  switch (spec.type) {
    case 'int':
    case 'float':
      input = el('input', {
        id, name: opt.field, type: 'number', step: spec.type === 'int' ? '1' : 'any',
        min: spec.min ?? undefined, max: spec.max ?? undefined, value: opt.default,
        inputmode: spec.type === 'int' ? 'numeric' : 'decimal',
      });
      if (spec.min !== null && spec.min !== undefined) hint.push(`min ${spec.min}`);
      if (spec.max !== null && spec.max !== undefined) hint.push(`max ${spec.max}`);
      break;
    case 'bool':
      input = el('input', { id, name: opt.field, type: 'checkbox' });
      input.checked = Boolean(opt.default);
      break;
    case 'select':
      input = el('select', { id, name: opt.field },
        (spec.options || []).map((o) => el('option', { value: o, text: o })));
      input.value = opt.default;
      break;
    case 'mapping':
      input = el('textarea', { id, name: opt.field, spellcheck: 'false' });
      input.value = JSON.stringify(opt.default ?? {}, null, 1);
      hint.push('JSON object');
      break;
    default:
      input = el('input', { id, name: opt.field, type: 'text', autocomplete: 'off' });
      input.value = opt.default ?? '';
  }
  const hintId = `${id}-hint`;
  if (hint.length) input.setAttribute('aria-describedby', hintId);
  return el('div', { class: 'field' },
    el('label', { for: id, text: opt.label || opt.field }),
    input,
    hint.length ? el('span', { id: hintId, class: 'hint', text: hint.join(', ') }) : null);
}

async function loadOptions() {
  const body = await api('GET', 'options');
  state.options = body.cluster_options || [];
  const box = $('option-fields');
  box.textContent = '';
  for (const opt of state.options) box.append(optionInput(opt));
}

/** The form's values with the option types; a value that does not parse is an error. */
function formOptions() {
  const out = {};
  for (const opt of state.options) {
    const input = $(`opt-${opt.field}`);
    const type = (opt.spec || {}).type;
    const label = opt.label || opt.field;
    if (type === 'int' || type === 'float') {
      if (input.value.trim() === '') throw new Error(`${label}: a number is needed`);
      const v = Number(input.value);
      if (!Number.isFinite(v) || (type === 'int' && !Number.isInteger(v))) {
        throw new Error(`${label}: ${input.value} is not ${type === 'int' ? 'an integer' : 'a number'}`);
      }
      out[opt.field] = v;
    } else if (type === 'bool') {
      out[opt.field] = input.checked;
    } else if (type === 'mapping') {
      let v;
      try { v = JSON.parse(input.value || '{}'); } catch (e) { throw new Error(`${label}: ${e.message}`); }
      if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new Error(`${label}: a JSON object is needed`);
      out[opt.field] = v;
    } else {
      out[opt.field] = input.value;
    }
  }
  return out;
}

async function createCluster(event) {
  event.preventDefault();
  const button = $('create');
  button.disabled = true;
  try {
    let options;
    try { options = formOptions(); } catch (e) { notify(e.message); return; }
    const workers = Number($('new-workers').value || 0);
    const created = await attempt('Creating the cluster', () => api('POST', 'clusters/', { cluster_options: options }));
    if (!created) return;
    notify(`Cluster ${created.name} created.`, 'info');
    state.open.add(created.name);
    if (workers > 0) pendingScale.set(created.name, workers);
    await refreshClusters();
    poll('Reading usage', refreshUsage);
  } finally {
    button.disabled = false;
  }
}

// A scale asked for at creation, sent once the cluster runs.
const pendingScale = new Map();

// -- clusters ------------------------------------------------------------------------------

function statusQuery() {
  const v = $('filter-status').value;
  if (v === 'active') return 'pending,running,stopping';
  if (v === 'all') return 'pending,running,stopping,stopped,failed';
  return v;
}

async function refreshClusters() {
  const list = await api('GET', `clusters/?details&status=${statusQuery()}`);
  state.clusters = Object.values(list).sort((a, b) => b.start_time - a.start_time);
  for (const [name, n] of pendingScale) {
    const c = state.clusters.find((x) => x.name === name);
    if (c && c.status === 'RUNNING') {
      pendingScale.delete(name);
      attempt('Scaling', () => api('POST', `clusters/${encodeURIComponent(name)}/scale`, { count: n }));
    } else if (!c || c.status === 'FAILED' || c.status === 'STOPPED') {
      pendingScale.delete(name);
    }
  }
  renderClusters();
}

function visibleClusters() {
  const user = $('filter-user').value.trim().toLowerCase();
  const group = $('filter-group').value.trim().toLowerCase();
  return state.clusters.filter((c) => (!user || c.owner.toLowerCase().includes(user))
    && (!group || (c.group || '(default)').toLowerCase().includes(group)));
}

function actionForm(label, fields, submit) {
  const f = el('form', { class: 'inline', 'aria-label': label });
  for (const x of fields) f.append(x);
  f.append(el('button', { type: 'submit', class: 'secondary', text: label }));
  f.addEventListener('submit', (e) => { e.preventDefault(); submit(); });
  return f;
}

function numberInput(name, label, value, min) {
  const id = `${name}-${Math.random().toString(36).slice(2)}`;
  const input = el('input', { id, type: 'number', min: min ?? 0, step: 1, value, inputmode: 'numeric' });
  return [el('label', { for: id, class: 'visually-hidden', text: label }), input];
}

function clusterActions(c) {
  const box = el('div', { class: 'actions' });
  const enc = encodeURIComponent(c.name);
  const active = ['PENDING', 'RUNNING'].includes(c.status);
  if (c.status === 'RUNNING') {
    const [scaleLabel, scaleInput] = numberInput('scale', `Workers for ${c.name}`, c.workers);
    box.append(actionForm('Scale', [scaleLabel, scaleInput], () => attempt('Scaling', async () => {
      const r = await api('POST', `clusters/${enc}/scale`, { count: Number(scaleInput.value) });
      if (r && r.msg) notify(r.msg, 'info');
      await refreshClusters();
    })));
    const [minLabel, minInput] = numberInput('min', `Adaptive minimum for ${c.name}`, 0);
    const [maxLabel, maxInput] = numberInput('max', `Adaptive maximum for ${c.name}`, Math.max(c.workers, 1));
    box.append(actionForm('Adapt', [minLabel, minInput, el('span', { 'aria-hidden': 'true', text: '–' }), maxLabel, maxInput],
      () => attempt('Adaptive scaling', async () => {
        const r = await api('POST', `clusters/${enc}/adapt`, {
          minimum: Number(minInput.value), maximum: Number(maxInput.value), active: true,
        });
        if (r && r.msg) notify(r.msg, 'info');
      })));
    if (c.dashboard_route) {
      box.append(el('a', {
        href: gatewayAddress() + c.dashboard_route, target: '_blank', rel: 'noopener noreferrer',
        text: 'Dashboard',
      }));
    }
  }
  const more = el('button', {
    type: 'button', class: 'secondary', 'aria-expanded': String(state.open.has(c.name)),
    text: state.open.has(c.name) ? 'Hide details' : 'Details',
  });
  more.addEventListener('click', () => {
    if (state.open.has(c.name)) state.open.delete(c.name); else state.open.add(c.name);
    renderClusters();
  });
  box.append(more);
  if (active || c.status === 'STOPPING') {
    // Two clicks: the first asks (for a few seconds), the second stops. No blocking dialog.
    const stop = el('button', { type: 'button', class: 'danger', text: 'Stop', disabled: c.status === 'STOPPING' });
    let armed = null;
    stop.addEventListener('click', () => {
      if (!armed) {
        stop.textContent = 'Confirm stop';
        stop.setAttribute('aria-label', `Confirm: stop cluster ${c.name}`);
        armed = window.setTimeout(() => {
          armed = null;
          stop.textContent = 'Stop';
          stop.removeAttribute('aria-label');
        }, 5000);
        return;
      }
      window.clearTimeout(armed);
      armed = null;
      stop.disabled = true;
      attempt('Stopping', async () => {
        const r = await fetch(`api/v1/clusters/${enc}`, { method: 'DELETE', credentials: 'same-origin' });
        if (!r.ok) {
          let m = `${r.status}`;
          try { m = (await r.json()).error || m; } catch (_) { /* no body */ }
          throw new Error(m);
        }
        await refreshClusters();
      });
    });
    box.append(stop);
  }
  return box;
}

function snippets(c) {
  const python = [
    'from dask_gateway import Gateway',
    `gateway = Gateway(${pyString(gatewayAddress())})`,
    `cluster = gateway.connect(${pyString(c.name)})`,
    'client = cluster.get_client()',
  ].join('\n');
  const cli = `gateway-cli --address ${shellWord(gatewayAddress())} info ${shellWord(c.name)}`;
  const block = (title, text) => {
    const pre = el('pre', { class: 'snippet', tabindex: '0', text });
    const copy = el('button', { type: 'button', class: 'secondary', text: `Copy ${title}` });
    copy.addEventListener('click', async () => {
      try {
        await navigator.clipboard.writeText(text);
        notify(`${title} copied.`, 'info');
      } catch (_) {
        const range = document.createRange();
        range.selectNodeContents(pre);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        notify('Selected: press Ctrl+C (⌘C) to copy.', 'info');
      }
    });
    return el('div', {}, el('strong', { text: title }), pre, copy);
  };
  return el('div', { class: 'snippets' }, block('Python', python), block('gateway-cli', cli));
}

function eventItem(e) {
  const when = new Date(e.time);
  return el('li', { class: e.type },
    el('time', { datetime: when.toISOString(), text: when.toLocaleString() }),
    el('span', { class: 'why', text: e.reason }),
    el('span', { class: 'src', text: e.source }),
    el('span', { class: 'msg', text: e.message }));
}

/** Follows a cluster's events while its details are open (server-sent events). */
function follow(name) {
  if (state.streams.has(name)) return;
  state.events.set(name, []);
  const source = new EventSource(`api/v1/clusters/${encodeURIComponent(name)}/events?follow`);
  source.addEventListener('cluster-event', (m) => {
    try {
      state.events.get(name).push(JSON.parse(m.data));
    } catch (_) { return; }
    const list = document.querySelector(`ul.events[data-cluster="${CSS.escape(name)}"]`);
    if (list) {
      list.append(eventItem(state.events.get(name).at(-1)));
      list.scrollTop = list.scrollHeight;
    }
  });
  // The stream ends when the cluster has finished; keep what came.
  source.addEventListener('error', () => { source.close(); });
  state.streams.set(name, source);
}

function unfollow(name) {
  const s = state.streams.get(name);
  if (s) s.close();
  state.streams.delete(name);
  state.events.delete(name);
}

function detailRow(c, columns) {
  follow(c.name);
  const list = el('ul', { class: 'events', 'data-cluster': c.name, 'aria-label': `Events of ${c.name}` },
    (state.events.get(c.name) || []).map(eventItem));
  const opts = Object.entries(c.options || {}).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`);
  return el('tr', { class: 'detail' }, el('td', { colspan: columns },
    el('p', {}, el('strong', { text: 'Options: ' }), opts.length ? opts.join(', ') : 'defaults'),
    c.reason ? el('p', {}, el('strong', { text: 'Reason: ' }), c.reason) : null,
    snippets(c),
    el('h3', { text: 'Events' }),
    list));
}

// Rows are kept per cluster and updated in place, so a number being typed into a row's form
// survives the refresh every two seconds.
const rowCache = new Map(); // name -> { row, cells, actionsKey, detail }

function makeRow(c) {
  const admin = state.me && state.me.admin;
  const cells = {
    name: el('td', { class: 'name', title: c.name, text: c.name }),
    owner: admin ? el('td', {}) : null,
    group: el('td', {}),
    status: el('td', {}),
    age: el('td', {}),
    workers: el('td', { class: 'num', title: 'running / wanted' }),
    cores: el('td', { class: 'num' }),
    memory: el('td', { class: 'num' }),
    actions: el('td', {}),
  };
  const row = el('tr', { 'data-cluster': c.name }, Object.values(cells));
  return { row, cells, actionsKey: null, detail: null };
}

function updateRow(entry, c) {
  const { cells } = entry;
  const set = (cell, text) => { if (cell && cell.textContent !== String(text)) cell.textContent = text; };
  set(cells.owner, c.owner);
  set(cells.group, c.group || '(default)');
  const statusKey = `${c.status}|${c.reason || ''}`;
  if (cells.status.dataset.key !== statusKey) {
    cells.status.dataset.key = statusKey;
    cells.status.replaceChildren(el('span', { class: `status ${c.status}`, text: c.status }),
      c.reason ? el('span', { class: 'reason', text: c.reason }) : '');
  }
  set(cells.age, age(c.start_time));
  set(cells.workers, c.workers_running === null || c.workers_running === undefined
    ? `${c.workers}` : `${c.workers_running} / ${c.workers}`);
  set(cells.cores, round(c.cores, 2));
  set(cells.memory, memory(c.memory));
  const actionsKey = `${c.status}|${c.dashboard_route || ''}|${state.open.has(c.name)}`;
  if (entry.actionsKey !== actionsKey) {
    entry.actionsKey = actionsKey;
    cells.actions.replaceChildren(clusterActions(c));
  }
}

function renderClusters() {
  const body = document.querySelector('#clusters tbody');
  const columns = state.me && state.me.admin ? 9 : 8;
  const rows = visibleClusters();
  const wanted = [];
  for (const c of rows) {
    let entry = rowCache.get(c.name);
    if (!entry) {
      entry = makeRow(c);
      rowCache.set(c.name, entry);
    }
    updateRow(entry, c);
    wanted.push(entry.row);
    if (state.open.has(c.name)) {
      if (!entry.detail) entry.detail = detailRow(c, columns);
      wanted.push(entry.detail);
    } else {
      entry.detail = null;
    }
  }
  const current = [...body.children];
  if (current.length !== wanted.length || current.some((node, i) => node !== wanted[i])) {
    body.replaceChildren(...wanted);
  }
  const known = new Set(state.clusters.map((c) => c.name));
  for (const name of [...rowCache.keys()]) if (!known.has(name)) rowCache.delete(name);
  for (const name of [...state.streams.keys()]) {
    if (!state.open.has(name) || !known.has(name)) unfollow(name);
  }
  $('no-clusters').hidden = rows.length > 0;
}

// -- usage and health ------------------------------------------------------------------------

function usageQuery() {
  const span = Number($('usage-window').value);
  const params = new URLSearchParams({ by: $('usage-by').value });
  if (span > 0) params.set('since', String(Date.now() - span));
  return params;
}

async function refreshUsage() {
  const params = usageQuery();
  const report = await api('GET', `usage?${params}`);
  const csv = new URLSearchParams(params);
  csv.set('format', 'csv');
  $('usage-csv').href = `api/v1/usage?${csv}`;
  const by = report.by;
  $('usage-key').textContent = by === 'user' ? 'User' : by === 'group' ? 'Group' : 'Cluster';
  const body = document.querySelector('#usage tbody');
  body.textContent = '';
  for (const r of report.rows) {
    const key = by === 'user' ? r.user : by === 'group' ? (r.group || '(default)') : `${r.cluster} (${r.user})`;
    body.append(el('tr', {},
      el('td', { class: by === 'cluster' ? 'name' : '', text: key }),
      el('td', { class: 'num', text: r.clusters_active }),
      el('td', { class: 'num', text: round(r.core_seconds / 3600, 3) }),
      el('td', { class: 'num', text: round(r.memory_byte_seconds / 3600 / 2 ** 30, 3) }),
      el('td', { class: 'num', text: round(r.cores_now, 2) })));
  }
  if (!report.rows.length) body.append(el('tr', {}, el('td', { colspan: 5, class: 'muted', text: 'No use in this window.' })));
}

async function refreshHealth() {
  if (!state.me || !state.me.admin) return;
  const o = await api('GET', 'overview');
  const now = Date.now();
  let rate = '–';
  if (state.lastRequests) {
    const dt = (now - state.lastRequests.at) / 1000;
    if (dt > 0) rate = round((o.api_requests - state.lastRequests.n) / dt, 2);
  }
  state.lastRequests = { n: o.api_requests, at: now };
  const items = [
    ...Object.entries(o.clusters).map(([k, v]) => [`Clusters ${k}`, v]),
    ['Workers wanted', o.workers],
    ['API requests/s', rate],
    ['Up', age(now - o.uptime_seconds * 1000)],
  ];
  const dl = $('health-list');
  dl.textContent = '';
  for (const [k, v] of items) dl.append(el('div', {}, el('dt', { text: k }), el('dd', { text: v })));
}

// -- start ---------------------------------------------------------------------------------

async function tick() {
  await poll('Reading clusters', refreshClusters);
}

/** Signs in, builds the form from the options, reads everything once, then polls. The page
 *  is marked busy (`aria-busy` on `main`) until that first read is done, and the create button
 *  is enabled once the form has its fields: a click before would send the defaults, or submit
 *  the bare form and reload the page. */
async function start() {
  try {
    const ok = await attempt('Signing in', loadMe);
    if (!ok && !state.me) return;
    await attempt('Reading options', loadOptions);
    $('new-cluster').addEventListener('submit', createCluster);
    $('create').disabled = false;
    for (const id of ['filter-user', 'filter-group']) $(id).addEventListener('input', renderClusters);
    $('filter-status').addEventListener('change', tick);
    for (const id of ['usage-window', 'usage-by']) {
      $(id).addEventListener('change', () => poll('Reading usage', refreshUsage));
    }
    await tick();
    await poll('Reading usage', refreshUsage);
    await poll('Reading the gateway status', refreshHealth);
  } finally {
    document.querySelector('main').removeAttribute('aria-busy');
  }
  window.setInterval(tick, POLL_MS);
  window.setInterval(() => poll('Reading usage', refreshUsage), 5000);
  window.setInterval(() => poll('Reading the gateway status', refreshHealth), 5000);
}

document.addEventListener('DOMContentLoaded', start);

/* robust-ensembles dashboard: plain JavaScript over the REST API (/v1), no framework, no build step.
 *
 * Pages (hash routes): #/ job list, #/jobs/<id> one job, #/compare?ids=<id>,<id>[,...] side by side,
 * #/models the registered models, #/models/<id> one model with its evaluations (docs/models.md).
 * #/new a job submission form (generated from GET /v1/specs and GET /v1/methods), #/new?clone=<id> the same form
 * holding that job's spec ("clone with changes").
 * Every request carries "Authorization: Bearer <token>" when a token is saved in the header form
 * (kept in localStorage). Curves are drawn as inline SVG.
 */
(() => {
  'use strict';

  const TOKEN_KEY = 're_api_token';
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
  const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelling', 'cancelled'];
  const KINDS = ['train', 'evaluate', 'tune', 'trial'];
  const JOB_FILTERS = ['status', 'kind', 'method', 'dataset', 'tag', 'q', 'since', 'until'];
  const COLORS = ['#2760a8', '#d1495b', '#2e8b57', '#e69f00', '#7b4fa8', '#0aa3b5', '#8c564b', '#d45fa0',
    '#5f6b78', '#a0a000'];
  const app = document.getElementById('app');
  const banner = document.getElementById('banner');
  let timers = [];
  let routeSeq = 0;

  // ------------------------------------------------------------------ API
  class ApiError extends Error {
    constructor(status, detail) {
      super(`HTTP ${status}: ${formatDetail(detail)}`);
      this.status = status;
      this.detail = detail;
    }
  }

  function formatDetail(d) {
    if (Array.isArray(d)) return d.map((x) => (x && x.field ? `${x.field}: ${x.msg}` : JSON.stringify(x))).join('; ');
    return typeof d === 'string' ? d : JSON.stringify(d);
  }

  function token() {
    return localStorage.getItem(TOKEN_KEY) || '';
  }

  function authHeaders(extra) {
    const hs = Object.assign({}, extra || {});
    const t = token();
    if (t) hs.Authorization = `Bearer ${t}`;
    return hs;
  }

  async function api(path, opts) {
    const o = Object.assign({}, opts || {});
    o.headers = authHeaders(o.headers);
    const r = await fetch(path, o);
    if (!r.ok) {
      let detail = r.statusText;
      try {
        detail = (await r.json()).detail;
      } catch (_) { /* not JSON: keep the status text */ }
      if (r.status === 401) detail = `${formatDetail(detail)} (enter the API token at the top right)`;
      throw new ApiError(r.status, detail);
    }
    return r;
  }

  async function getJSON(path) {
    return (await api(path)).json();
  }

  // ------------------------------------------------------------------ DOM helpers
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.setAttribute('class', v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function appendAll(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function showError(e) {
    const msg = e instanceof Error ? e.message : String(e);
    banner.textContent = msg;
    banner.hidden = false;
  }

  function clearError() {
    banner.hidden = true;
    banner.textContent = '';
  }

  // ------------------------------------------------------------------ formatting
  const pad = (n) => String(n).padStart(2, '0');

  function fmtTime(iso) {
    if (!iso) return '–';
    const d = new Date(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return '–';
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }

  function jobDuration(job) {
    if (!job.started_at) return null;
    const end = job.finished_at ? new Date(job.finished_at) : new Date();
    return (end - new Date(job.started_at)) / 1000;
  }

  /** Numbers as the dashboard shows them: 4 decimals; integers from 1000 on; 4 significant digits below 0.001. */
  function fmtNum(v) {
    if (v === null || v === undefined) return '–';
    if (typeof v !== 'number') return String(v);
    if (!isFinite(v)) return String(v);
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a > 0 && a < 0.001) return v.toExponential(3);
    return v.toFixed(4);
  }

  function fmtBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  const shortId = (id) => String(id).slice(0, 8);

  function methodOf(job) {
    const sp = job.spec || {};
    if (job.kind === 'train') return sp.method || '–';
    if (job.kind === 'trial') return sp.method || (sp.config && sp.config.method) || `trial ${sp.trial_id || ''}`.trim();
    if (job.kind === 'tune') return (sp.base && sp.base.method) || '–';
    if (job.kind === 'evaluate') {
      if (sp.target_job) return `target ${shortId(sp.target_job)}`;
      if (sp.target_model) return `model ${shortId(sp.target_model)}`;
      return sp.target_checkpoint ? 'checkpoint' : '–';
    }
    return '–';
  }

  function statusBadge(status) {
    return h('span', { class: `status status-${status}`, 'data-status': status }, status);
  }

  function progressBar(p, big) {
    const pct = Math.max(0, Math.min(1, Number(p) || 0)) * 100;
    return h('span', {},
      h('span', { class: big ? 'bar big' : 'bar' }, h('span', { style: `width:${pct.toFixed(1)}%` })),
      `${pct.toFixed(0)}%`);
  }

  function where(job) {
    const parts = [];
    if (job.stage) parts.push(job.stage);
    if (job.epoch) parts.push(`epoch ${job.epoch}${job.total_epochs ? `/${job.total_epochs}` : ''}`);
    return parts.join(', ') || '–';
  }

  // ------------------------------------------------------------------ polling
  /** Run fn every ms milliseconds while this page is shown (never two runs at once). */
  function every(fn, ms) {
    const seq = routeSeq;
    let busy = false;
    const id = setInterval(async () => {
      if (seq !== routeSeq) {
        clearInterval(id);
        return;
      }
      if (busy) return;
      busy = true;
      try {
        await fn();
      } catch (e) {
        showError(e);
      } finally {
        busy = false;
      }
    }, ms);
    timers.push(id);
    return id;
  }

  // ------------------------------------------------------------------ charts (inline SVG)
  function niceStep(span, target) {
    const raw = span / Math.max(1, target);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
  }

  function ticks(lo, hi, target, integer) {
    let step = niceStep(hi - lo || 1, target);
    if (integer) step = Math.max(1, Math.round(step));
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function tickLabel(v) {
    if (v === 0) return '0';
    const a = Math.abs(v);
    if (a >= 1000 || a < 0.001) return v.toExponential(1);
    return String(Number(v.toPrecision(4)));
  }

  /**
   * A line chart: series = [{name, color, points: [[x, y], ...]}]. Each point has a tooltip (<title>)
   * with its exact value; the legend lists the series.
   */
  function lineChart(title, series, opts) {
    const o = Object.assign({ width: 470, height: 250, xLabel: 'epoch' }, opts || {});
    const m = { l: 56, r: 14, t: 10, b: 36 };
    const W = o.width - m.l - m.r;
    const H = o.height - m.t - m.b;
    const pts = series.flatMap((se) => se.points);
    let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 0.5; y0 -= d; y1 += d; }
    const padY = (y1 - y0) * 0.06;
    y0 -= padY; y1 += padY;
    const X = (x) => m.l + ((x - x0) / (x1 - x0)) * W;
    const Y = (y) => m.t + H - ((y - y0) / (y1 - y0)) * H;
    const svg = s('svg', { width: o.width, height: o.height, viewBox: `0 0 ${o.width} ${o.height}`, role: 'img',
      'aria-label': title });
    const axes = s('g', { 'font-size': 11, fill: '#66707a' });
    for (const v of ticks(y0, y1, 5, false)) {
      axes.append(s('line', { x1: m.l, x2: m.l + W, y1: Y(v), y2: Y(v), stroke: '#eceff2' }));
      axes.append(s('text', { x: m.l - 6, y: Y(v) + 4, 'text-anchor': 'end' }, tickLabel(v)));
    }
    for (const v of ticks(x0, x1, 8, true)) {
      axes.append(s('line', { x1: X(v), x2: X(v), y1: m.t + H, y2: m.t + H + 4, stroke: '#99a2ab' }));
      axes.append(s('text', { x: X(v), y: m.t + H + 16, 'text-anchor': 'middle' }, tickLabel(v)));
    }
    axes.append(s('line', { x1: m.l, x2: m.l + W, y1: m.t + H, y2: m.t + H, stroke: '#99a2ab' }));
    axes.append(s('line', { x1: m.l, x2: m.l, y1: m.t, y2: m.t + H, stroke: '#99a2ab' }));
    axes.append(s('text', { x: m.l + W / 2, y: o.height - 4, 'text-anchor': 'middle' }, o.xLabel));
    svg.append(axes);
    series.forEach((se) => {
      const sorted = [...se.points].sort((a, b) => a[0] - b[0]);
      const d = sorted.map((p, i) => `${i ? 'L' : 'M'}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(' ');
      const g = s('g', { 'data-series': se.name });
      g.append(s('path', { d, fill: 'none', stroke: se.color, 'stroke-width': 2 }));
      for (const p of sorted) {
        g.append(s('circle', { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: se.color },
          s('title', {}, `${se.name}, ${o.xLabel} ${p[0]}: ${fmtNum(p[1])}`)));
      }
      svg.append(g);
    });
    const legend = h('div', { class: 'legend' },
      series.map((se) => h('span', {}, h('i', { style: `background:${se.color}` }), se.name)));
    return h('div', { class: 'chart', 'data-chart': title }, h('div', { class: 'title' }, title), svg, legend);
  }

  /** Metric names -> chart groups: losses, accuracies, then one chart per other metric. */
  function groupMetrics(names) {
    const groups = [];
    const acc = names.filter((n) => /(^|_)acc(_|$)/.test(n));
    const loss = names.filter((n) => !acc.includes(n) && n.startsWith('train_'));
    if (loss.length) groups.push(['Training loss', loss]);
    if (acc.length) groups.push(['Accuracy', acc]);
    const titles = { lr: 'Learning rate', epoch_time_s: 'Epoch time (s)' };
    for (const n of names) {
      if (!acc.includes(n) && !loss.includes(n)) groups.push([titles[n] || n, [n]]);
    }
    return groups;
  }

  function byName(points) {
    const out = new Map();
    for (const p of points) {
      if (!out.has(p.name)) out.set(p.name, []);
      out.get(p.name).push([p.step, p.value]);
    }
    return out;
  }

  // ------------------------------------------------------------------ tables
  function table(columns, rows, attrs) {
    return h('table', attrs || {},
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', {}, c)))),
      h('tbody', {}, rows.map((r) => h('tr', {}, r.map((c) => (c instanceof Node && c.tagName === 'TD' ? c : h('td', {}, c)))))));
  }

  function numCell(v, extra) {
    return h('td', Object.assign({ class: 'num' }, extra || {}), fmtNum(v));
  }

  function section(id, title, ...body) {
    return h('section', { id }, h('h2', {}, title), ...body);
  }

  // ------------------------------------------------------------------ downloads and images (with the token)
  async function download(jobId, name) {
    const r = await api(`/v1/jobs/${jobId}/artifacts/${encodePath(name)}`);
    const url = URL.createObjectURL(await r.blob());
    const a = h('a', { href: url, download: name.split('/').pop() });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function encodePath(name) {
    return name.split('/').map(encodeURIComponent).join('/');
  }

  async function artifactImage(jobId, name) {
    const r = await api(`/v1/jobs/${jobId}/artifacts/${encodePath(name)}`);
    const url = URL.createObjectURL(await r.blob());
    return h('figure', {}, h('img', { src: url, alt: name, 'data-artifact': name }), h('figcaption', { class: 'muted' }, name));
  }

  // ------------------------------------------------------------------ page: job list
  async function renderJobs(params) {
    const seq = routeSeq;
    const selected = new Set();
    // the filters of GET /v1/jobs, kept in the page's address (#/?status=running&method=pdd&tag=x ...)
    const filters = Object.fromEntries(JOB_FILTERS.map((k) => [k, params.get(k) || '']));
    const go = () => {
      const q = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
      location.hash = `#/${q.toString() ? `?${q}` : ''}`;
    };
    let methods = [];
    let datasets = [];
    try {
      const [m, specs] = await Promise.all([getJSON('/v1/methods'), getJSON('/v1/specs')]);
      methods = m.items.map((x) => x.name);
      datasets = specs.kinds.train.properties.dataset.enum || [];
    } catch (e) {
      // the lists are a convenience: without them the filters are free text
    }
    if (seq !== routeSeq) return;
    const count = h('span', { class: 'muted' });
    const compareBtn = h('button', { type: 'button', id: 'compare-btn', disabled: true, onclick: () => {
      location.hash = `#/compare?ids=${[...selected].join(',')}`;
    } }, 'Compare selected');
    const select = (name, values) => (values.length ? h('select', { id: `filter-${name}`, 'aria-label': name,
      onchange: (e) => { filters[name] = e.target.value; go(); } },
    h('option', { value: '' }, `any ${name}`), values.map((v) => h('option', { value: v, selected: v === filters[name] }, v)))
      : field(name, name, 'search'));
    const field = (name, label, type) => h('input', { id: `filter-${name}`, type, 'aria-label': label, placeholder: label,
      title: label, value: filters[name], onchange: (e) => { filters[name] = e.target.value.trim(); go(); } });
    const holder = h('div', { id: 'jobs' }, h('p', { class: 'muted' }, 'Loading…'));
    app.replaceChildren(h('h1', {}, 'Jobs'),
      h('div', { class: 'toolbar' }, select('status', STATUSES), select('kind', KINDS), select('method', methods),
        select('dataset', datasets), field('tag', 'tag', 'search'), field('q', 'search id, note, tags', 'search'),
        h('label', {}, 'from ', field('since', 'created on or after', 'date')),
        h('label', {}, 'before ', field('until', 'created before', 'date'))),
      h('div', { class: 'toolbar' }, compareBtn, count), holder);

    const updateCompare = () => {
      compareBtn.disabled = selected.size < 2;
      compareBtn.textContent = `Compare selected (${selected.size})`;
    };

    async function load() {
      const q = new URLSearchParams({ limit: '200' });
      for (const k of JOB_FILTERS) if (filters[k]) q.set(k, filters[k]);
      let data;
      try {
        data = await getJSON(`/v1/jobs?${q}`);
      } catch (e) {
        // a filter the API refuses (422 naming it): say so instead of an empty list
        if (seq === routeSeq) holder.replaceChildren(h('p', { class: 'error', id: 'jobs-error' }, String(e.message || e)));
        return;
      }
      if (seq !== routeSeq) return;
      count.textContent = `${data.items.length} of ${data.total} job(s), newest first; refreshed ${fmtTime(new Date().toISOString()).slice(11)}`;
      if (!data.items.length) {
        holder.replaceChildren(h('p', { class: 'muted' }, 'No jobs yet. Submit one with New job above, `robust-ensembles submit` or POST /v1/jobs.'));
        return;
      }
      const rows = data.items.map((j) => {
        const box = h('input', { type: 'checkbox', 'aria-label': `select ${j.id}`, checked: selected.has(j.id),
          onchange: (e) => {
            if (e.target.checked) selected.add(j.id); else selected.delete(j.id);
            e.target.closest('tr').classList.toggle('selected', e.target.checked);
            updateCompare();
          } });
        return h('tr', { 'data-job-id': j.id, class: selected.has(j.id) ? 'selected' : null },
          h('td', {}, box),
          h('td', {}, h('a', { href: `#/jobs/${j.id}`, title: j.id }, shortId(j.id))),
          h('td', {}, j.kind),
          h('td', {}, methodOf(j)),
          h('td', {}, statusBadge(j.status)),
          h('td', {}, progressBar(j.progress)),
          h('td', {}, where(j)),
          h('td', {}, fmtTime(j.created_at)),
          h('td', { class: 'num' }, fmtDuration(jobDuration(j))));
      });
      holder.replaceChildren(h('table', { id: 'jobs-table' },
        h('thead', {}, h('tr', {}, ['', 'job', 'kind', 'method', 'status', 'progress', 'stage / epoch', 'created',
          'duration'].map((c) => h('th', {}, c)))),
        h('tbody', {}, rows)));
      updateCompare();
    }

    await load();
    every(load, 3000);
  }

  // ------------------------------------------------------------------ page: one job
  function summary(job) {
    const facts = [
      ['status', statusBadge(job.status)],
      ['progress', progressBar(job.progress, true)],
      ['stage / epoch', where(job)],
      ['method', methodOf(job)],
      ['attempts', `${job.attempts - (job.infra_failures || 0)} of ${job.max_attempts}` +
        (job.infra_failures ? ` (+ ${job.infra_failures} lost to infrastructure, not charged)` : '')],
      ['created', fmtTime(job.created_at)],
      ['started', fmtTime(job.started_at)],
      ['finished', fmtTime(job.finished_at)],
      ['duration', fmtDuration(jobDuration(job))],
      ['worker', job.lease_owner || '–'],
    ];
    if (job.depends_on && job.depends_on.length) {
      facts.push(['depends on', job.depends_on.map((d) => h('a', { href: `#/jobs/${d}` }, `${shortId(d)} `))]);
    }
    if (job.parent_id) facts.push(['parent', h('a', { href: `#/jobs/${job.parent_id}` }, shortId(job.parent_id))]);
    const dl = h('dl', { class: 'facts', id: 'job-facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', { 'data-fact': k }, v)]));
    const out = [dl];
    if (job.error) out.push(h('p', { class: 'error-text', id: 'job-error' }, job.error));
    if (!TERMINAL.has(job.status) && job.status !== 'cancelling') {
      out.push(h('p', {}, h('button', { type: 'button', id: 'cancel-btn', onclick: async () => {
        if (!window.confirm(`Cancel job ${job.id}?`)) return;
        try {
          await api(`/v1/jobs/${job.id}/cancel`, { method: 'POST' });
        } catch (e) {
          showError(e);
        }
      } }, 'Cancel job')));
    }
    return out;
  }

  function curves(points) {
    if (!points.length) return [h('p', { class: 'muted' }, 'No per-epoch metrics (yet).')];
    const series = byName(points);
    const names = [...series.keys()].sort();
    const charts = groupMetrics(names).map(([title, ns]) => lineChart(title,
      ns.map((n, i) => ({ name: n, color: COLORS[i % COLORS.length], points: series.get(n) }))));
    const lastStep = Math.max(...points.map((p) => p.step));
    const last = names.map((n) => {
      const pts = series.get(n).filter((p) => p[0] === lastStep);
      return pts.length ? [n, numCell(pts[pts.length - 1][1], { 'data-metric': n })] : null;
    }).filter(Boolean);
    return [h('div', { class: 'charts' }, charts),
      h('h3', {}, `Epoch ${lastStep}`),
      table(['metric', 'value'], last, { id: 'last-epoch' })];
  }

  function resultTables(job, result) {
    const out = [];
    if (result.metrics && typeof result.metrics === 'object') {
      const rows = Object.entries(result.metrics).filter(([, v]) => typeof v === 'number')
        .map(([k, v]) => [k, numCell(v, { 'data-metric': k })]);
      if (rows.length) out.push(h('h3', {}, 'Final metrics'), table(['metric', 'value'], rows, { id: 'final-metrics' }));
    }
    if (Array.isArray(result.tables)) {
      for (const t of result.tables) {
        out.push(h('h3', {}, t.title || t.name),
          table(t.columns, t.rows.map((r) => r.map((c) => String(c))), { 'data-table': t.name, class: 'robustness' }));
        if (t.notes) out.push(h('p', { class: 'muted' }, t.notes));
      }
    }
    if (job.kind === 'tune' && result.best) {
      out.push(h('h3', {}, 'Best trial'), h('pre', {}, JSON.stringify(result.best, null, 2)));
    }
    out.push(h('details', {}, h('summary', {}, 'Raw result JSON'), h('pre', { id: 'raw-result' }, JSON.stringify(result, null, 2))));
    return out;
  }

  function artifactTable(jobId, items) {
    if (!items.length) return [h('p', { class: 'muted' }, 'No artifacts (yet).')];
    const rows = items.map((a) => [
      h('a', { href: '#', 'data-artifact': a.name, onclick: (e) => {
        e.preventDefault();
        download(jobId, a.name).catch(showError);
      } }, a.name),
      h('td', { class: 'num' }, fmtBytes(a.size)),
      fmtTime(a.modified)]);
    const out = [table(['file', 'size', 'modified'], rows, { id: 'artifacts-table' })];
    if (items.some((a) => a.name.startsWith('tensorboard/'))) {
      out.push(h('p', { class: 'muted' }, 'TensorBoard: download the tensorboard/ files into one directory and run ',
        h('code', {}, 'tensorboard --logdir <that directory>'), '.'));
    }
    return out;
  }

  async function renderJob(id) {
    const seq = routeSeq;
    let job = await getJSON(`/v1/jobs/${id}`);
    if (seq !== routeSeq) return;
    const head = h('div', { id: 'summary' });
    const curvesBox = h('div', { id: 'curves' });
    const resultsBox = h('div', { id: 'results' }, h('p', { class: 'muted' }, 'No results yet.'));
    const plotsBox = h('div', { id: 'plots', class: 'plots' });
    const logsBox = h('pre', { id: 'logs', class: 'logs' });
    const artifactsBox = h('div', { id: 'artifacts' });
    const eventsBox = h('div', { id: 'events' });
    const trialsBox = h('div', { id: 'trials' });
    const title = h('h1', {}, `${job.kind} job `, h('span', { title: job.id }, shortId(job.id)));
    const actions = job.kind === 'trial' ? null : h('p', { class: 'toolbar' },
      h('a', { href: `#/new?clone=${job.id}`, id: 'clone-btn', class: 'button' }, 'Clone with changes'),
      h('span', { class: 'muted' }, 'a new job from this one\'s spec, with the changes you make'));
    const sections = [title, actions, head,
      section('curves-section', 'Curves (per epoch)', curvesBox),
      job.kind === 'tune' ? section('trials-section', 'Trials', trialsBox) : null,
      section('results-section', 'Results', resultsBox),
      section('plots-section', 'Plots', plotsBox),
      section('logs-section', 'Logs', logsBox),
      section('artifacts-section', 'Artifacts', artifactsBox),
      section('events-section', 'Events', eventsBox),
      section('spec-section', 'Spec (resolved)', h('pre', { id: 'spec' }, JSON.stringify(job.spec, null, 2)))];
    app.replaceChildren(...sections.filter(Boolean));  // replaceChildren would print a null as text
    let logAfter = 0;
    let resultShown = false;
    let plotNames = new Set();

    async function loadLogs() {
      for (;;) {
        const data = await getJSON(`/v1/jobs/${id}/logs?after=${logAfter}&limit=1000`);
        if (seq !== routeSeq) return;
        if (!data.items.length) break;
        const stick = logsBox.scrollTop + logsBox.clientHeight >= logsBox.scrollHeight - 4;
        logsBox.append(data.items.map((l) => `${fmtTime(l.at).slice(11)}  ${l.line}\n`).join(''));
        if (stick) logsBox.scrollTop = logsBox.scrollHeight;
        logAfter = data.next_after;
        if (data.items.length < 1000) break;
      }
    }

    async function loadMetrics() {
      const data = await getJSON(`/v1/jobs/${id}/metrics`);
      if (seq !== routeSeq) return;
      curvesBox.replaceChildren(...curves(data.items));
      // evaluate and tune jobs report no epochs: no empty section for them
      curvesBox.parentElement.hidden = !data.items.length && job.kind !== 'train' && job.kind !== 'trial';
    }

    async function loadArtifacts() {
      const data = await getJSON(`/v1/jobs/${id}/artifacts`);
      if (seq !== routeSeq) return;
      artifactsBox.replaceChildren(...artifactTable(id, data.items));
      const pngs = data.items.filter((a) => a.name.endsWith('.png') && !plotNames.has(`${a.name}@${a.modified}`));
      if (pngs.length) {
        plotNames = new Set(data.items.filter((a) => a.name.endsWith('.png')).map((a) => `${a.name}@${a.modified}`));
        const figures = await Promise.all(data.items.filter((a) => a.name.endsWith('.png')).map((a) => artifactImage(id, a.name)));
        if (seq !== routeSeq) return;
        plotsBox.replaceChildren(...figures);
      } else if (!plotNames.size) {
        plotsBox.replaceChildren(h('p', { class: 'muted' }, 'No plots.'));
      }
    }

    async function loadResults() {
      if (!job.has_result || resultShown) return;
      const result = await getJSON(`/v1/jobs/${id}/results`);
      if (seq !== routeSeq) return;
      resultsBox.replaceChildren(...resultTables(job, result));
      resultShown = true;
    }

    async function loadTrials() {
      if (job.kind !== 'tune') return;
      const data = await getJSON(`/v1/jobs/${id}/trials`);
      if (seq !== routeSeq) return;
      if (!data.items.length) {
        trialsBox.replaceChildren(h('p', { class: 'muted' }, 'No trials yet.'));
        return;
      }
      const metric = (job.spec && job.spec.metric) || 'metric';
      trialsBox.replaceChildren(table(['trial', 'status', 'progress', 'config', `best ${metric}`, 'epochs'],
        data.items.map((t) => {
          const r = t.result || {};
          return [h('a', { href: `#/jobs/${t.id}`, title: t.id }, (t.spec && t.spec.trial_id) || shortId(t.id)),
            statusBadge(t.status), progressBar(t.progress), h('code', {}, JSON.stringify((t.spec || {}).config || {})),
            numCell(typeof r.best === 'number' ? r.best : null), h('td', { class: 'num' }, String(r.epochs_done ?? '–'))];
        }), { id: 'trials-table' }));
    }

    async function loadEvents() {
      const items = await getJSON(`/v1/jobs/${id}/events`);
      if (seq !== routeSeq) return;
      eventsBox.replaceChildren(table(['at', 'event', 'from → to', 'attempt', 'worker', 'detail'],
        items.map((e) => [fmtTime(e.at), e.event, `${e.from_status || '–'} → ${e.to_status || '–'}`,
          h('td', { class: 'num' }, String(e.attempt)), e.worker || '–', e.detail || ''])));
    }

    head.replaceChildren(...summary(job));
    await Promise.all([loadMetrics(), loadLogs(), loadArtifacts(), loadResults(), loadEvents(), loadTrials()]);
    if (TERMINAL.has(job.status)) return;

    let tick = 0;
    const timer = every(async () => {
      const prev = job;
      job = await getJSON(`/v1/jobs/${id}`);
      if (seq !== routeSeq) return;
      head.replaceChildren(...summary(job));
      await loadLogs();
      tick += 1;
      const finished = TERMINAL.has(job.status);
      if (finished || prev.epoch !== job.epoch || tick % 5 === 0) await loadMetrics();
      if (finished || prev.status !== job.status) await loadEvents();
      if (finished || tick % 5 === 0) await loadArtifacts();
      if (finished || tick % 3 === 0) await loadTrials();
      await loadResults();
      if (finished) clearInterval(timer);
    }, 2000);
  }

  // ------------------------------------------------------------------ page: comparison
  function flatten(obj, prefix, out) {
    for (const [k, v] of Object.entries(obj || {})) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === 'object' && !Array.isArray(v)) flatten(v, key, out);
      else out[key] = JSON.stringify(v);
    }
    return out;
  }

  /** The numbers of a job's result to line up: train metrics, or the evaluate job's records. */
  function resultNumbers(job, result) {
    const out = new Map();
    if (!result) return out;
    if (result.metrics && typeof result.metrics === 'object') {
      for (const [k, v] of Object.entries(result.metrics)) if (typeof v === 'number') out.set(k, v);
    }
    if (result.clean && typeof result.clean === 'object') {
      for (const [model, c] of Object.entries(result.clean)) {
        if (c && typeof c.clean_acc === 'number') out.set(`${model} · clean_acc`, c.clean_acc);
      }
    }
    if (Array.isArray(result.records)) {
      for (const r of result.records) {
        if (typeof r.robust_acc !== 'number') continue;
        out.set(`${r.model} · ${r.threat} ${r.attack} · eps ${r.eps} · robust_acc`, r.robust_acc);
      }
    }
    return out;
  }

  // A job id as the API issues it: only such ids are put into request paths (a crafted link cannot
  // make the page send its token to another path, e.g. "../../v1/jobs?..." or "x/cancel").
  const JOB_ID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

  async function renderCompare(given) {
    const seq = routeSeq;
    const ids = [...new Set(given.filter((id) => JOB_ID.test(id)))];
    const refused = given.filter((id) => !JOB_ID.test(id));
    const input = h('input', { id: 'compare-ids', size: 80, value: ids.join(','), placeholder: 'job ids, comma-separated' });
    const form = h('form', { class: 'toolbar', onsubmit: (e) => {
      e.preventDefault();
      const list = input.value.split(/[\s,]+/).filter(Boolean);
      location.hash = `#/compare?ids=${list.join(',')}`;
    } }, h('label', { for: 'compare-ids' }, 'Jobs'), input, h('button', { type: 'submit' }, 'Compare'));
    app.replaceChildren(h('h1', {}, 'Compare jobs'), form);
    if (refused.length) {
      app.append(h('p', { class: 'error-text', id: 'compare-refused' },
        `Not job ids, left out: ${refused.map((x) => JSON.stringify(x.slice(0, 60))).join(', ')}`));
    }
    if (ids.length < 2) {
      app.append(h('p', { class: 'muted' }, 'Pick two or more jobs on the job list (checkboxes), or enter their ids.'));
      return;
    }
    const jobs = await Promise.all(ids.map((id) => getJSON(`/v1/jobs/${id}`)));
    const [metrics, results] = await Promise.all([
      Promise.all(ids.map((id) => getJSON(`/v1/jobs/${id}/metrics`))),
      Promise.all(jobs.map((j) => (j.has_result ? getJSON(`/v1/jobs/${j.id}/results`) : Promise.resolve(null)))),
    ]);
    if (seq !== routeSeq) return;
    // a DOM node lives in one place: every table gets its own header cells
    const jobLinks = () => jobs.map((j) => h('a', { href: `#/jobs/${j.id}`, title: j.id }, `${shortId(j.id)} (${methodOf(j)})`));
    const head = ['', ...jobLinks()];

    const overview = [
      ['kind', ...jobs.map((j) => j.kind)],
      ['status', ...jobs.map((j) => statusBadge(j.status))],
      ['method', ...jobs.map(methodOf)],
      ['progress', ...jobs.map((j) => progressBar(j.progress))],
      ['created', ...jobs.map((j) => fmtTime(j.created_at))],
      ['duration', ...jobs.map((j) => fmtDuration(jobDuration(j)))],
    ];

    const specs = jobs.map((j) => flatten(j.spec, '', {}));
    const keys = [...new Set(specs.flatMap((sp) => Object.keys(sp)))].sort();
    const differing = keys.filter((k) => new Set(specs.map((sp) => sp[k])).size > 1)
      .map((k) => [k, ...specs.map((sp) => (k in sp ? sp[k] : '–'))]);

    const numbers = jobs.map((j, i) => resultNumbers(j, results[i]));
    const rowNames = [...new Set(numbers.flatMap((m) => [...m.keys()]))];
    const resultRows = rowNames.map((name) => {
      const vals = numbers.map((m) => m.get(name));
      const present = vals.filter((v) => typeof v === 'number');
      const best = /acc/.test(name) && !/abstain/.test(name) && present.length > 1 ? Math.max(...present) : null;
      return [name, ...vals.map((v, i) => numCell(v, { class: v === best ? 'num best' : 'num', 'data-job': ids[i], 'data-metric': name }))];
    });

    const perJob = metrics.map((m) => byName(m.items));
    const names = [...new Set(perJob.flatMap((m) => [...m.keys()]))].sort();
    const shared = names.filter((n) => perJob.filter((m) => m.has(n)).length > 1);
    const chartNames = shared.length ? shared : names;
    const ordered = [...chartNames.filter((n) => /acc/.test(n)), ...chartNames.filter((n) => !/acc/.test(n))];
    const charts = ordered.map((n) => lineChart(n, jobs.map((j, i) => (perJob[i].has(n)
      ? { name: `${shortId(j.id)} ${methodOf(j)}`, color: COLORS[i % COLORS.length], points: perJob[i].get(n) } : null))
      .filter(Boolean)));

    app.append(
      section('compare-overview', 'Overview', table(head, overview, { id: 'compare-table' })),
      section('compare-results', 'Results side by side',
        resultRows.length ? table(['metric', ...jobLinks()], resultRows, { id: 'compare-results-table' })
          : h('p', { class: 'muted' }, 'None of these jobs has results yet.'),
        h('p', { class: 'muted' }, 'Accuracies are fractions (1 = 100%); the best of each accuracy row is in bold. '
          + 'Evaluate jobs: robust accuracy over all examples of the slice.')),
      section('compare-curves', 'Curves (per epoch)', charts.length ? h('div', { class: 'charts' }, charts)
        : h('p', { class: 'muted' }, 'No per-epoch metrics.')),
      section('compare-spec', 'Spec differences', differing.length ? table(['key', ...jobLinks()], differing)
        : h('p', { class: 'muted' }, 'The specs are identical.')));
  }

  // ------------------------------------------------------------------ page: new job / clone with changes
  // The form is generated from GET /v1/specs (the body's fields and each kind's spec, JSON schemas) and, for a
  // train spec's hyperparameters, from the chosen method's schema in GET /v1/methods. The browser does not
  // validate (the form is novalidate): the API does, and its 422 messages are shown at the fields they name.
  let specsCache = null;
  let methodsCache = null;

  async function loadSpecs() {
    if (!specsCache) specsCache = await getJSON('/v1/specs');
    return specsCache;
  }

  async function loadMethods() {
    if (!methodsCache) methodsCache = (await getJSON('/v1/methods')).items;
    return methodsCache;
  }

  function deref(schema, defs) {
    if (schema && schema.$ref) return (defs || {})[schema.$ref.split('/').pop()] || {};
    return schema || {};
  }

  /** A property's schema without its "or null" (anyOf [X, null]), and whether null is allowed. */
  function unwrap(schema, defs) {
    const sc = deref(schema, defs);
    if (!Array.isArray(sc.anyOf)) return { sc, nullable: false };
    const non = sc.anyOf.filter((a) => a.type !== 'null');
    const outer = { description: sc.description, default: sc.default, title: sc.title };
    if (non.length !== 1) return { sc: outer, nullable: non.length < sc.anyOf.length };
    return { sc: Object.assign({}, deref(non[0], defs), outer), nullable: true };
  }

  function boundsText(sc) {
    const b = [];
    if (sc.minimum !== undefined) b.push(`≥ ${sc.minimum}`);
    if (sc.exclusiveMinimum !== undefined) b.push(`> ${sc.exclusiveMinimum}`);
    if (sc.maximum !== undefined) b.push(`≤ ${sc.maximum}`);
    if (sc.exclusiveMaximum !== undefined) b.push(`< ${sc.exclusiveMaximum}`);
    if (sc.maxLength !== undefined) b.push(`at most ${sc.maxLength} characters`);
    if (sc.maxItems !== undefined) b.push(`at most ${sc.maxItems} items`);
    return b.join(', ');
  }

  const fieldId = (path) => `f-${path.join('-')}`;

  /**
   * One input for one schema property: {path, row, get(), dirty}. get() returns the value to send or throws a
   * local problem (text that is not JSON). Kinds: select (enum), checkbox (boolean), on/off/default (boolean or
   * null), number, text, comma-separated list (array of strings), JSON text (anything else).
   */
  function makeField(path, name, schema, defs, value, opts) {
    const { sc, nullable } = unwrap(schema, defs);
    const key = path.join('.');
    const id = fieldId(path);
    const field = { path, key, dirty: false, always: !!(opts && opts.always) };
    const common = { id, name: key, 'aria-describedby': `${id}-hint` };
    const type = sc.type;
    let input;
    if (Array.isArray(sc.enum)) {
      const labels = (opts && opts.labels) || {};
      input = h('select', common,
        nullable ? h('option', { value: '' }, 'default') : null,
        sc.enum.map((v) => h('option', { value: String(v), selected: v === value }, labels[v] || String(v))));
      if (nullable && (value === null || value === undefined)) input.value = '';
      field.get = () => (input.value === '' ? null : sc.enum.find((v) => String(v) === input.value));
    } else if (type === 'boolean' && !nullable) {
      input = h('input', Object.assign({ type: 'checkbox', checked: value === true }, common));
      field.get = () => input.checked;
    } else if (type === 'boolean') {
      input = h('select', common, h('option', { value: '' }, 'default'), h('option', { value: 'true' }, 'on'),
        h('option', { value: 'false' }, 'off'));
      input.value = value === true ? 'true' : value === false ? 'false' : '';
      field.get = () => (input.value === '' ? null : input.value === 'true');
    } else if (type === 'integer' || type === 'number') {
      input = h('input', Object.assign({ type: 'number', step: type === 'integer' ? '1' : 'any', min: sc.minimum,
        max: sc.maximum, placeholder: nullable ? 'default' : null, class: 'num-input' }, common));
      input.value = typeof value === 'number' ? String(value) : '';
      // an empty or unreadable number is sent as null: the API's message then names the field
      field.get = () => (input.value.trim() === '' ? null : Number(input.value));
    } else if (type === 'string') {
      const long = sc.maxLength && sc.maxLength > 200;
      input = long ? h('textarea', Object.assign({ rows: 3, cols: 50 }, common))
        : h('input', Object.assign({ type: 'text', size: 40, placeholder: nullable ? 'default' : null }, common));
      input.value = typeof value === 'string' ? value : '';
      field.get = () => (nullable && input.value === '' ? null : input.value);
    } else if (type === 'array' && sc.items && deref(sc.items, defs).type === 'string' && !deref(sc.items, defs).enum) {
      input = h('input', Object.assign({ type: 'text', size: 40, placeholder: 'comma-separated' }, common));
      input.value = Array.isArray(value) ? value.join(', ') : '';
      field.get = () => input.value.split(',').map((x) => x.trim()).filter(Boolean);
    } else {
      const text = value === undefined || value === null ? '' : JSON.stringify(value);
      input = h('textarea', Object.assign({ rows: Math.min(8, Math.max(1, Math.ceil(text.length / 70))), cols: 70,
        spellcheck: 'false', placeholder: nullable ? 'default (JSON)' : 'JSON', class: 'json-input' }, common));
      input.value = text;
      field.get = () => {
        if (input.value.trim() === '') return nullable ? null : undefined;
        try {
          return JSON.parse(input.value);
        } catch (e) {
          throw new Error(`not valid JSON: ${e.message}`);
        }
      };
    }
    const mark = () => { field.dirty = true; };
    input.addEventListener('input', mark);
    input.addEventListener('change', mark);
    field.input = input;
    const kindText = Array.isArray(sc.enum) ? 'one of the list' : type === 'array' && sc.items ? 'list' : type || 'JSON';
    const dflt = schema.default !== undefined ? schema.default : sc.default;
    const hint = [[kindText, boundsText(sc)].filter(Boolean).join(', '),
      dflt !== undefined ? `default ${dflt === null ? 'none' : JSON.stringify(dflt)}` : null,
      sc.description || schema.description || null].filter(Boolean).join(' · ');
    field.error = h('p', { class: 'field-error', 'data-error-for': key, role: 'alert', hidden: true });
    field.row = h('div', { class: 'field', 'data-field': key },
      h('label', { for: id }, name), input, h('span', { class: 'hint muted', id: `${id}-hint` }, hint), field.error);
    return field;
  }

  /** Fields for every property of an object schema; nested objects (optimizer, schedule ...) become fieldsets. */
  function makeFields(path, schema, defs, values, fields, opts) {
    const required = new Set(schema.required || []);
    const out = [];
    for (const [name, prop] of Object.entries(schema.properties || {})) {
      const p = [...path, name];
      const sc = deref(prop, defs);
      const value = values ? values[name] : undefined;
      if (opts && opts.special && opts.special[name]) {
        out.push(opts.special[name](p, prop, value));
      } else if (sc.type === 'object' && sc.properties) {
        const box = h('fieldset', { class: 'group', 'data-field': p.join('.') }, h('legend', {}, name),
          sc.description ? h('p', { class: 'muted' }, sc.description) : null);
        box.append(...makeFields(p, sc, defs, value && typeof value === 'object' ? value : undefined, fields));
        out.push(box);
      } else {
        const dflt = prop.default !== undefined ? prop.default : sc.default;
        const f = makeField(p, name, prop, defs, value !== undefined ? value : dflt,
          { always: required.has(name), labels: opts && opts.labels && opts.labels[name] });
        fields.push(f);
        out.push(f.row);
      }
    }
    return out;
  }

  function setPath(obj, path, value) {
    let o = obj;
    for (const k of path.slice(0, -1)) {
      if (!o[k] || typeof o[k] !== 'object' || Array.isArray(o[k])) o[k] = {};
      o = o[k];
    }
    o[path[path.length - 1]] = value;
  }

  async function renderNewJob(params) {
    const seq = routeSeq;
    const cloneId = params.get('clone');
    if (cloneId !== null && !JOB_ID.test(cloneId)) throw new Error(`not a job id: ${JSON.stringify(cloneId.slice(0, 60))}`);
    const [specs, methods, source] = await Promise.all([loadSpecs(), loadMethods(),
      cloneId ? getJSON(`/v1/jobs/${cloneId}`) : Promise.resolve(null)]);
    if (seq !== routeSeq) return;
    if (source && !specs.kinds[source.kind]) {
      throw new Error(`a ${source.kind} job cannot be submitted itself; clone the job it belongs to`);
    }
    const kinds = Object.keys(specs.kinds);
    let kind = source ? source.kind : (kinds.includes(params.get('kind')) ? params.get('kind') : 'train');
    let fields = [];
    const summaryBox = h('div', { id: 'submit-errors', class: 'error-text', role: 'alert', hidden: true });
    const jobBox = h('fieldset', { class: 'group', id: 'job-fields' }, h('legend', {}, 'Job'));
    const specBox = h('div', { id: 'spec-fields' });
    const kindSelect = h('select', { id: 'new-kind', name: 'kind', disabled: !!source, onchange: () => {
      kind = kindSelect.value;
      build();
    } }, kinds.map((k) => h('option', { value: k, selected: k === kind }, k)));
    const submitBtn = h('button', { type: 'submit', id: 'submit-job' }, source ? 'Submit the clone' : 'Submit job');
    const status = h('span', { id: 'submit-status', class: 'muted' });
    const form = h('form', { id: 'new-job-form', class: 'jobform', novalidate: true, autocomplete: 'off', onsubmit: (e) => {
      e.preventDefault();
      submit().catch(showError);
    } },
    h('div', { class: 'field' }, h('label', { for: 'new-kind' }, 'kind'), kindSelect,
      h('span', { class: 'hint muted' }, source ? 'the kind of the job cloned' : 'train an ensemble, evaluate one, or tune a train spec')),
    summaryBox, jobBox, specBox, h('p', { class: 'toolbar' }, submitBtn, status));
    const title = source
      ? h('h1', {}, 'Clone with changes: ', h('a', { href: `#/jobs/${source.id}`, title: source.id }, `${source.kind} job ${shortId(source.id)}`))
      : h('h1', {}, 'New job');
    const intro = source
      ? h('p', { class: 'muted' }, 'The form holds the job\'s resolved spec; change what you want and submit a new job. '
        + 'The original is not touched.')
      : h('p', { class: 'muted' }, 'Fields start at their defaults; only the fields you change (and the method and '
        + 'data set) are sent, the API fills in the rest. The API checks every value and its messages appear at the '
        + 'fields they name.');
    app.replaceChildren(title, intro, form);

    function methodLabels() {
      return Object.fromEntries(methods.map((m) => [m.name, `${m.name} — ${m.title}`]));
    }

    function hyperparameterBox(path, prop, value) {
      const box = h('fieldset', { class: 'group', id: 'hp-fields', 'data-field': path.join('.') });
      const err = h('p', { class: 'field-error', 'data-error-for': path.join('.'), role: 'alert', hidden: true });
      box.fill = (methodName, values) => {
        for (let i = fields.length - 1; i >= 0; i -= 1) {  // in place: build() is still filling this array
          if (fields[i].path.slice(0, path.length).join('.') === path.join('.')) fields.splice(i, 1);
        }
        const m = methods.find((x) => x.name === methodName);
        box.replaceChildren(h('legend', {}, `hyperparameters of ${methodName}`),
          m && m.summary ? h('p', { class: 'muted' }, m.summary) : null, err);
        const schema = (m && m.schema) || { properties: {} };
        if (!Object.keys(schema.properties || {}).length) box.append(h('p', { class: 'muted' }, 'This method has none.'));
        const explicit = !!(source && methodName === source.spec.method);
        const before = fields.length;
        box.append(...makeFields(path, schema, schema.$defs, values, fields));
        for (const f of fields.slice(before)) f.always = explicit;
      };
      box.errorFor = err;
      box.fill((source && source.spec.method) || (specs.kinds.train.properties.method || {}).default, value);
      return box;
    }

    function build() {
      fields = [];
      summaryBox.hidden = true;
      const jobValues = source ? { priority: source.priority, max_attempts: source.max_attempts,
        deadline_seconds: source.deadline_seconds, tags: source.tags, note: source.note } : undefined;
      jobBox.replaceChildren(h('legend', {}, 'Job'), ...makeFields([], specs.job, specs.job.$defs, jobValues, fields));
      const schema = specs.kinds[kind];
      const special = {};
      let hpBox = null;
      if (kind === 'train') {
        special.hyperparameters = (p, prop, value) => { hpBox = hyperparameterBox(p, prop, value); return hpBox; };
      }
      const box = h('fieldset', { class: 'group' }, h('legend', {}, `${kind} spec`),
        schema.description ? h('p', { class: 'muted' }, schema.description) : null);
      box.append(...makeFields(['spec'], schema, schema.$defs, source ? source.spec : undefined, fields,
        { special, labels: { method: methodLabels() } }));
      specBox.replaceChildren(box);
      if (source) fields.forEach((f) => { f.always = true; });
      if (kind === 'train') {
        const methodField = fields.find((f) => f.key === 'spec.method');
        const datasetField = fields.find((f) => f.key === 'spec.dataset');
        const membersField = fields.find((f) => f.key === 'spec.members');
        methodField.always = true;
        datasetField.always = true;
        methodField.input.addEventListener('change', () => {
          const name = methodField.get();
          hpBox.fill(name, source && name === source.spec.method ? source.spec.hyperparameters : undefined);
          const m = methods.find((x) => x.name === name);
          if (m && membersField && !membersField.dirty && !source) membersField.input.value = String(m.default_members);
        });
        const m = methods.find((x) => x.name === methodField.get());
        if (m && membersField && !source) membersField.input.value = String(m.default_members);
      }
    }

    function clearErrors() {
      summaryBox.hidden = true;
      summaryBox.replaceChildren();
      form.querySelectorAll('.field-error').forEach((e) => { e.hidden = true; e.textContent = ''; });
      form.querySelectorAll('.invalid').forEach((e) => e.classList.remove('invalid'));
    }

    /** Put each message at the field it names (or the nearest enclosing one); list them all above the form. */
    function showErrors(items) {
      clearErrors();
      const boxes = [...form.querySelectorAll('[data-error-for]')];
      let first = null;
      for (const it of items) {
        const where = String(it.field || 'body');
        const parts = where.split('.');
        let target = null;
        for (let n = parts.length; n > 0 && !target; n -= 1) {
          const k = parts.slice(0, n).join('.');
          target = boxes.find((b) => b.dataset.errorFor === k) || null;
        }
        if (target) {
          const text = where === target.dataset.errorFor ? it.msg : `${where}: ${it.msg}`;
          target.hidden = false;
          target.append(h('span', { 'data-error-field': where }, target.childNodes.length ? ` · ${text}` : text));
          target.parentElement.classList.add('invalid');
          if (!first) first = target.parentElement.querySelector('input, select, textarea');
        }
      }
      summaryBox.append(h('p', {}, items.length === 1 ? 'The API refused the job:' : `The API refused the job (${items.length} problems):`),
        h('ul', {}, items.map((it) => h('li', { 'data-error-field': String(it.field || '') }, `${it.field || 'body'}: ${it.msg}`))));
      summaryBox.hidden = false;
      if (first) first.focus();
    }

    async function submit() {
      clearErrors();
      const body = { kind, spec: source ? JSON.parse(JSON.stringify(source.spec)) : {} };
      if (source && kind === 'train' && fields.find((f) => f.key === 'spec.method').get() !== source.spec.method) {
        delete body.spec.hyperparameters;  // the old method's hyperparameters mean nothing to the new one
      }
      const local = [];
      for (const f of fields) {
        if (!f.dirty && !f.always) continue;
        let v;
        try {
          v = f.get();
        } catch (e) {
          local.push({ field: f.key, msg: e.message });
          continue;
        }
        if (v === undefined) continue;
        setPath(body, f.path, v);
      }
      if (local.length) {
        showErrors(local);
        summaryBox.firstChild.textContent = 'Not sent: fix these first.';
        return;
      }
      submitBtn.disabled = true;
      status.textContent = 'Submitting…';
      try {
        const r = await fetch('/v1/jobs', { method: 'POST', headers: authHeaders({ 'Content-Type': 'application/json' }),
          body: JSON.stringify(body) });
        let data = null;
        try {
          data = await r.json();
        } catch (_) { /* not JSON */ }
        if (r.status === 422 && data && Array.isArray(data.detail)) {
          status.textContent = '';
          showErrors(data.detail);
          return;
        }
        if (!r.ok) {
          let detail = data && data.detail !== undefined ? data.detail : r.statusText;
          if (r.status === 401) detail = `${formatDetail(detail)} (enter the API token at the top right)`;
          throw new ApiError(r.status, detail);
        }
        status.textContent = `Submitted: job ${data.id}`;
        location.hash = `#/jobs/${data.id}`;
      } finally {
        submitBtn.disabled = false;
        if (status.textContent === 'Submitting…') status.textContent = '';
      }
    }

    build();
  }

  // ------------------------------------------------------------------ pages: models (docs/models.md)
  const pct = (v) => (v === null || v === undefined ? '–' : `${(100 * v).toFixed(1)}%`);
  const js = (v) => (v === null || v === undefined ? 'none' : JSON.stringify(v));

  async function renderModels() {
    const data = await getJSON('/v1/models?limit=500');
    const rows = data.items.map((m) => [
      h('a', { href: `#/models/${m.id}`, 'data-model': m.id }, m.name), m.version, `${m.members} × ${m.architecture}`,
      m.dataset, m.combine, m.source === 'train_job' ? h('a', { href: `#/jobs/${m.source_job_id}` }, 'train job') : 'upload',
      (m.tags || []).join(', ') || '–', fmtBytes(m.size_bytes), fmtTime(m.created_at)]);
    app.replaceChildren(h('h1', {}, 'Models'),
      h('p', { class: 'muted' }, `${data.total} registered model(s). Upload with `, h('code', {}, 'robust-ensembles models upload'),
        ' or POST /v1/models; register a train job from the CLI (models register).'),
      rows.length ? table(['name', 'version', 'members', 'dataset', 'rule', 'source', 'tags', 'size', 'created'], rows,
        { id: 'models-table' }) : h('p', { class: 'muted', id: 'models-table' }, 'No models yet.'));
  }

  async function exportFile(modelId, name) {
    const r = await api(`/v1/models/${modelId}/export/huggingface/${encodeURIComponent(name)}`);
    const url = URL.createObjectURL(await r.blob());
    const a = h('a', { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  async function renderModel(id) {
    const seq = routeSeq;
    const [m, evals] = await Promise.all([getJSON(`/v1/models/${id}`), getJSON(`/v1/models/${id}/evaluations`)]);
    if (seq !== routeSeq) return;
    const cfg = m.config || {};
    const val = cfg.validation || {};
    const inp = cfg.input || {};
    const facts = [
      ['id', m.id], ['owner', m.owner || '–'], ['members', `${m.members} × ${m.architecture}`], ['dataset', m.dataset],
      ['combine rule', m.combine],
      ['input', `${js(inp.shape)}, the members' range ${js(inp.range)}, mean ${js(inp.mean)}, std ${js(inp.std)}`],
      ['source', m.source === 'train_job' ? h('a', { href: `#/jobs/${m.source_job_id}` }, `train job ${shortId(m.source_job_id)}`) : 'upload'],
      ['tags', (m.tags || []).join(', ') || '–'], ['weights', `${fmtBytes(m.size_bytes)}, sha256 ${m.sha256.slice(0, 16)}…`],
      ['upload check', val.images ? `${val.source}: ensemble ${pct(val.accuracy)}, members ${(val.member_accuracy || []).map(pct).join(', ')}` : '–'],
      ['created', fmtTime(m.created_at)]];
    const evalRows = [];
    for (const e of evals.items) {
      let clean = null;
      let worst = null;
      if (e.status === 'succeeded') {
        const res = await getJSON(`/v1/jobs/${e.id}/results`);
        if (seq !== routeSeq) return;
        clean = ((res.clean || {}).target || {}).clean_acc;
        const wc = (res.records || []).filter((r) => r.model === 'target' && r.threat === 'worst-case');
        worst = wc.map((r) => `${r.attack} ε=${r.eps}: ${pct(r.robust_acc)}${r.unreliable ? ' ⚠' : ''}`).join('; ');
      }
      evalRows.push([h('a', { href: `#/jobs/${e.id}` }, shortId(e.id)), statusBadge(e.status), pct(clean), worst || '–',
        fmtTime(e.created_at)]);
    }
    const files = ['config.json', 'model.safetensors', 'README.md'].map((f) => h('button', {
      type: 'button', class: 'download', 'data-export': f, onclick: () => exportFile(m.id, f).catch(showError) }, f));
    const rb = h('button', { type: 'button', id: 'export-robustbench', onclick: async () => {
      try {
        const rec = await getJSON(`/v1/models/${m.id}/export/robustbench`);
        pre.textContent = JSON.stringify(rec, null, 2);
      } catch (e) { showError(e); }
    } }, 'RobustBench record');
    const pre = h('pre', { id: 'robustbench-record' });
    app.replaceChildren(h('h1', {}, `${m.name} `, h('span', { class: 'muted' }, `v${m.version}`)),
      section('model-facts', 'Model', table(['', ''], facts, { id: 'model-facts-table' })),
      section('model-evaluations', 'Evaluations', evalRows.length
        ? table(['job', 'status', 'clean', 'worst case (robust accuracy)', 'created'], evalRows, { id: 'model-evals' })
        : h('p', { class: 'muted', id: 'model-evals' }, 'No evaluations yet: submit an evaluate job with target_model.')),
      section('model-export', 'Export', h('p', {}, 'Hugging Face layout: ', files), h('p', {}, rb), pre),
      section('model-training', 'Training', h('pre', {}, typeof cfg.training === 'string' ? cfg.training
        : JSON.stringify(cfg.training, null, 2) || '–')));
  }

  // ------------------------------------------------------------------ router and token form
  function route() {
    routeSeq += 1;
    delete document.body.dataset.ready;  // set again once the page has rendered (tests wait for it)
    timers.forEach(clearInterval);
    timers = [];
    clearError();
    const hash = location.hash.replace(/^#/, '') || '/';
    const [path, query] = hash.split('?');
    const params = new URLSearchParams(query || '');
    let page;
    const m = path.match(/^\/jobs\/([0-9a-fA-F-]{36})$/);
    const mm = path.match(/^\/models\/([0-9a-fA-F-]{36})$/);
    if (m) page = renderJob(m[1]);
    else if (mm) page = renderModel(mm[1]);
    else if (path === '/models') page = renderModels();
    else if (path === '/compare') page = renderCompare((params.get('ids') || '').split(',').filter(Boolean));
    else if (path === '/new') page = renderNewJob(params);
    else page = renderJobs(params);
    page.then(() => { document.body.dataset.ready = String(routeSeq); }, (e) => {
      showError(e);
      document.body.dataset.ready = String(routeSeq);
    });
  }

  function initToken() {
    const form = document.getElementById('token-form');
    const field = document.getElementById('token');
    const state = document.getElementById('token-state');
    const show = () => { state.textContent = token() ? 'saved' : ''; };
    field.value = token();
    show();
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const v = field.value.trim();
      if (v) localStorage.setItem(TOKEN_KEY, v); else localStorage.removeItem(TOKEN_KEY);
      show();
      route();
    });
  }

  window.addEventListener('hashchange', route);
  initToken();
  route();
})();

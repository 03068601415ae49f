// circuitgraph viewer: views, hover lineage, node cards and supernodes over pyvis's global
// `network`, `nodes` and `edges`. Every string from the graph is written with textContent or drawn
// on the canvas; nothing is parsed as HTML. Data: see circuitgraph/viewer/page_data.py.
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('cg-data').textContent);
  window.cgData = D;
  var N = D.nodes, E = D.edges, nE = E.length / 4;
  var FONT = '#222222', FONT_DIM = 'rgba(34,34,34,0.15)', FONT_UNKEPT = '#9a9a9a', UNKEPT = 0.4;
  var EXCITE = '#0072B2', INHIBIT = '#D55E00', LABEL_BG = 'rgba(255,255,255,0.7)';  // labels stay legible over edges
  function font(size, color) { return {face: 'monospace', size: size, color: color, background: LABEL_BG}; }
  var S = {view: D.default_view, lit: null, groups: [], extra: [], drawn: {}, guideX: 0, guideY: 0};
  var indexOf = {};
  N.forEach(function (n, p) { indexOf[n.id] = p; });
  D.groups.forEach(function (g) { S.groups.push({name: g.name, members: g.members, collapsed: false, suggested: true}); });

  function byId(id) { return document.getElementById(id); }
  function el(tag, text, style) {
    var e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (style) e.setAttribute('style', style);
    return e;
  }
  function fmt(x) { return (Math.abs(x) >= 100 || x === 0) ? String(Math.round(x * 100) / 100) : x.toPrecision(3); }

  // --- the drawn graph: a view's nodes and edges, groups collapsed into supernodes -----------------
  function superId(name) {
    var id = 'super:' + name;
    while (indexOf[id] !== undefined) id += '~';
    return id;
  }
  function draw() {
    var v = S.view, doc = D.views[v], shown = {}, k = 0, rep = {}, supers = [];
    N.forEach(function (n) { if (n.views >> v & 1 || n.pin) { shown[n.id] = [doc.xy[2 * k], doc.xy[2 * k + 1]]; k++; } });
    S.groups.forEach(function (g) {
      var present = g.members.filter(function (p) { return shown[N[p].id] !== undefined; });
      if (!g.collapsed || present.length === 0) return;
      var sid = superId(g.name), at = shown[N[present[0]].id];  // the first member's slot is free once it hides
      supers.push({id: sid, label: g.name + ' (' + present.length + ')', x: at[0], y: at[1], shape: 'hexagon',
                   color: '#7F7F7F', size: 10, physics: false, font: font(D.font_px, FONT)});
      present.forEach(function (p) { rep[N[p].id] = sid; delete shown[N[p].id]; });
      g.drawn = present;
    });
    var agg = {}, list = [];
    for (var q = 0; q < nE; q++) {
      if (!(E[4 * q + 3] >> v & 1)) continue;
      var s = N[E[4 * q]].id, t = N[E[4 * q + 1]].id;
      s = rep[s] || s; t = rep[t] || t;
      if (s === t) continue;
      var key = s + '>' + t;
      if (agg[key] === undefined) { agg[key] = {id: key, from: s, to: t, w: 0}; list.push(agg[key]); }
      agg[key].w += E[4 * q + 2];
    }
    var maxw = list.reduce(function (m, e) { return Math.max(m, Math.abs(e.w)); }, 1e-12);
    list.forEach(function (e) {
      e.base = e.w >= 0 ? EXCITE : INHIBIT;
      e.color = {color: e.base, highlight: e.base, hover: e.base, opacity: 0.55};
      e.width = 0.4 + 4.6 * Math.abs(e.w) / maxw;
    });
    nodes.update(N.map(function (n) {
      var at = shown[n.id], kept = (n.views >> v & 1) === 1;
      return at ? {id: n.id, hidden: false, x: at[0], y: at[1], opacity: kept ? 1 : UNKEPT,
                   font: font(n.font, kept ? FONT : FONT_UNKEPT)}
                : {id: n.id, hidden: true};
    }));
    nodes.remove(S.extra);
    nodes.add(supers);
    S.extra = supers.map(function (s) { return s.id; });
    edges.clear();
    edges.add(list);
    S.drawn = shown;
    S.lit = null;
    window.cgLit = null;
    info();
    groupList();
  }

  // --- the default zoom: the whole view when its labels stay readable, else the outputs' corner --
  // at the smallest readable zoom (a long prompt continues to the left; drag to see it)
  function fit() {
    var doc = D.views[S.view], b = doc.box, box = byId('mynetwork');
    var x0 = b[0] - 8, x1 = b[2] + 8, y0 = b[1] - 8, y1 = b[3] + 8;
    var guidePx = doc.rows.reduce(function (m, r) { return Math.max(m, r[1].length * 7 + 20); }, 0);
    var colPx = doc.cols.length ? 24 : 0, w = box.clientWidth - guidePx, h = box.clientHeight - colPx;
    var minFont = N.reduce(function (m, n, p) { return S.drawn[n.id] ? Math.min(m, n.font) : m; }, Infinity);
    var readable = D.min_label_px / (isFinite(minFont) ? minFont : D.font_px);
    var all = Math.min(1.5, Math.min(w / (x1 - x0), h / (y1 - y0)));
    var scale = Math.max(all, readable), cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    S.partial = all < readable;
    if (S.partial) {  // keep the right edge (the last positions, the outputs) and, if it is taller, the top
      cx = x1 - w / (2 * scale);
      if ((y1 - y0) * scale > h) cy = y0 + h / (2 * scale);
    }
    S.guideX = x0;
    S.guideY = y1;
    network.moveTo({position: {x: cx - guidePx / (2 * scale), y: cy + colPx / (2 * scale)}, scale: scale, animation: false});
    info();
  }

  // --- hover: a node's ancestors and descendants stay lit, the rest dims ------------------------
  function lineage(id) {
    var up = {}, down = {}, all = edges.get();
    all.forEach(function (e) { (up[e.to] = up[e.to] || []).push(e.from); (down[e.from] = down[e.from] || []).push(e.to); });
    function walk(adj) {
      var seen = {}, stack = [id];
      seen[id] = true;
      while (stack.length) {
        (adj[stack.pop()] || []).forEach(function (m) { if (!seen[m]) { seen[m] = true; stack.push(m); } });
      }
      return seen;
    }
    return {anc: walk(up), desc: walk(down), edges: all};
  }
  function highlight(id) {
    S.lit = id;
    var L = id === null ? null : lineage(id);
    var lit = null;
    if (L) { lit = {}; Object.keys(L.anc).concat(Object.keys(L.desc)).forEach(function (m) { lit[m] = true; }); }
    nodes.update(nodes.get({filter: function (n) { return !n.hidden; }}).map(function (n) {
      var p = indexOf[n.id], size = p === undefined ? D.font_px : N[p].font;
      if (lit === null) {
        var kept = p === undefined || (N[p].views >> S.view & 1) === 1;
        return {id: n.id, opacity: kept ? 1 : UNKEPT, font: font(size, kept ? FONT : FONT_UNKEPT)};
      }
      var on = lit[n.id] === true;
      return {id: n.id, opacity: on ? 1 : 0.12, font: font(size, on ? FONT : FONT_DIM)};
    }));
    edges.update((L ? L.edges : edges.get()).map(function (e) {
      var on = L === null || (L.anc[e.from] && L.anc[e.to]) || (L.desc[e.from] && L.desc[e.to]);
      return {id: e.id, color: {color: e.base, highlight: e.base, hover: e.base, opacity: L === null ? 0.55 : (on ? 0.95 : 0.04)}};
    }));
    window.cgLit = lit === null ? null : Object.keys(lit);
  }

  // --- the card of a node -----------------------------------------------------------------------
  function link(id, text) {
    var a = el('a', text, 'cursor:pointer;color:#1565c0;display:block;font-family:monospace;white-space:pre;' +
               'overflow:hidden;text-overflow:ellipsis');
    a.addEventListener('click', function () { go(id); });
    return a;
  }
  function strongest(card, p, incoming) {
    var rows = [], v = S.view, inView = (N[p].views >> v & 1) === 1;
    for (var q = 0; q < nE; q++) {
      if (E[4 * q + (incoming ? 1 : 0)] !== p || (inView && !(E[4 * q + 3] >> v & 1))) continue;
      rows.push([E[4 * q + (incoming ? 0 : 1)], E[4 * q + 2]]);
    }
    rows.sort(function (a, b) { return Math.abs(b[1]) - Math.abs(a[1]); });
    card.appendChild(el('h4', (incoming ? 'strongest inputs' : 'strongest outputs') + ' (' + rows.length + ' ' +
      (inView ? 'in view ' + (v + 1) : 'in any view of this page') + ')'));
    rows.slice(0, 8).forEach(function (r) {
      var o = N[r[0]];
      card.appendChild(link(o.id, (r[1] >= 0 ? '+' : '') + fmt(r[1]) + '  ' + o.id + '  ' + o.label));
    });
  }
  function attention(card, q, n) {
    // head loadings (which head of this layer carried each input) and QK pairs (why it attended)
    var layer = n.site.split('.')[0];
    card.appendChild(el('h4', 'inputs by attention head (' + layer + '; the parts sum to the edge)'));
    q.heads.forEach(function (r) {
      var total = r[1].reduce(function (a, b) { return a + b; }, 0);
      var parts = r[1].map(function (v, h) { return 'H' + h + ' ' + fmt(v); }).join('  ');
      card.appendChild(link(r[0], r[0] + '  ' + fmt(total) + ' = ' + parts));
    });
    q.pairs.forEach(function (a) {
      card.appendChild(el('h4', 'why L' + a.layer + '.H' + a.head + ' attends ' + a.query + ' -> ' + a.key +
        ' (from ' + a.source + '): score ' + fmt(a.score) + ' = sum of terms ' + fmt(a.sum_of_terms) +
        ', attention ' + fmt(a.pattern)));
      a.top_pairs.forEach(function (t) {
        card.appendChild(el('div', (t[2] >= 0 ? '+' : '') + fmt(t[2]) + '  query ' + t[0] + '  x  key ' + t[1],
                            'font-family:monospace;white-space:pre'));
      });
    });
  }
  function contexts(card, f) {
    card.appendChild(el('h4', 'top-activating contexts (density ' + fmt(f.density) + ')'));
    f.contexts.forEach(function (c) {
      var line = el('div', undefined, 'margin:2px 0;font-family:monospace;white-space:pre-wrap');
      var mx = Math.max.apply(null, c.acts.concat([1e-9]));
      c.tokens.forEach(function (t, i) {
        var a = Math.max(0, c.acts[i]) / mx;
        var s = el('span', t, 'background:rgba(255,120,0,' + a.toFixed(3) + ')' + (i === c.peak ? ';outline:1px solid #000' : ''));
        s.title = 'activation ' + c.acts[i];
        line.appendChild(s);
      });
      card.appendChild(line);
    });
    if (f.ablation) {
      card.appendChild(el('h4', 'ablation effect on the prompt (next-token log-likelihood)'));
      var ab = el('div', undefined, 'font-family:monospace;white-space:pre-wrap');
      f.ablation.tokens.forEach(function (t, i) {
        var d = i > 0 ? f.ablation.delta[i - 1] : 0, m = Math.min(1, Math.abs(d));
        var s = el('span', t, 'text-decoration:underline;text-decoration-thickness:3px;text-decoration-color:' +
                   (d < 0 ? 'rgba(220,0,0,' : 'rgba(0,0,220,') + m + ')');
        s.title = 'change ' + d;
        ab.appendChild(s);
      });
      card.appendChild(ab);
    }
    card.appendChild(el('h4', 'promotes'));
    card.appendChild(el('div', f.promoted.map(function (p) { return p[0] + ' (' + p[1] + ')'; }).join(', ')));
    card.appendChild(el('h4', 'suppresses'));
    card.appendChild(el('div', f.suppressed.map(function (p) { return p[0] + ' (' + p[1] + ')'; }).join(', ')));
  }
  function show(id) {
    var card = byId('cg-card');
    card.replaceChildren();
    var p = indexOf[id];
    card.appendChild(el('h3', id));
    if (p === undefined) {
      var g = S.groups.filter(function (x) { return superId(x.name) === id; })[0];
      if (!g) { card.appendChild(el('div', 'no node ' + id + ' in this page')); return; }
      card.appendChild(el('div', 'supernode of ' + g.drawn.length + ' nodes (edges summed; expand it in "groups")'));
      g.drawn.forEach(function (m) { card.appendChild(link(N[m].id, N[m].id + '  ' + N[m].label)); });
      return;
    }
    var n = N[p];
    if (!S.drawn[id]) card.appendChild(el('div', '(not drawn in this view)', 'color:#b00'));
    if (n.kind === 'token') card.appendChild(el('div', 'token ' + JSON.stringify(n.text) + ' at position ' + n.pos));
    else if (n.kind === 'error') card.appendChild(el('div', 'reconstruction error of ' + n.site + (n.pos === null ? '' : ' at position ' + n.pos) +
      ': the part of the site output its dictionary misses; influence ' + fmt(n.inf)));
    else if (n.kind === 'logit') {
      card.appendChild(el('div', 'output token ' + JSON.stringify(n.text) + ' at position ' + n.pos + ': ' +
        (n.prob === null ? 'the model\'s probability was not recorded with this graph' : 'the model\'s probability ' + fmt(n.prob)) +
        '; mean-centred logit ' + fmt(n.act)));
      card.appendChild(el('div', n.out_weight > 0 ? 'weight in influence ' + fmt(n.out_weight) + ' (its probability)'
        : 'weight in influence 0: the metric carries all the output weight'));
    } else if (n.kind === 'metric') {
      card.appendChild(el('div', 'the explained quantity: ' + D.metric));
      if (D.outputs) card.appendChild(el('div', D.outputs));
    }
    else {
      card.appendChild(el('div', 'label: ' + n.text));
      card.appendChild(el('div', (n.kind === 'supernode' ? '' : 'activation ' + fmt(n.act) + '   ') + 'influence ' + fmt(n.inf)));
    }
    var members = (D.supernodes || {})[id.replace(/^super:/, '')];
    if (n.kind === 'supernode' && members) card.appendChild(el('div', 'members: ' + members.join(', ')));
    if (n.card) contexts(card, D.cards[n.card]);
    strongest(card, p, true);
    if (D.qk && D.qk[id]) attention(card, D.qk[id], n);
    strongest(card, p, false);
  }
  function go(id) {
    if (S.drawn[id] || S.extra.indexOf(id) >= 0) { network.selectNodes([id]); network.focus(id, {scale: Math.max(network.getScale(), 1)}); }
    show(id);
  }

  // --- controls ----------------------------------------------------------------------------------
  function info() {
    var doc = D.views[S.view], kept = N.filter(function (n) { return n.pin && !(n.views >> S.view & 1); }).length;
    byId('cg-view-info').textContent = 'view ' + (S.view + 1) + ' of ' + D.views.length + ': node threshold ' +
      doc.node_threshold + ', edge threshold ' + doc.edge_threshold + ', at most ' + doc.max_edges + ' edges' +
      (S.view === D.ct_view ? ' (circuit-tracer\'s default)' : '') + ': ' + doc.n_nodes + ' nodes, ' + doc.n_edges +
      ' edges shown of ' + D.n_nodes + ' nodes, ' + D.n_edges + ' edges' +
      (S.view === D.default_view && D.default_view < D.ct_view ? '. Opened on the densest view readable in a 1400 x 900 ' +
       'window; the slider adds more' : '') +
      (kept ? '. ' + kept + ' dimmed tokens / outputs are not in this view' : '') +
      (S.partial ? '. At a readable zoom the graph is wider than the window: drag to pan, scroll to zoom out' : '');
  }
  function groupList() {
    var box = byId('cg-group-list');
    box.replaceChildren();
    byId('cg-groups-title').textContent = 'supernodes: ' + S.groups.length + ' (' +
      S.groups.filter(function (g) { return g.suggested; }).length + ' suggested by graph-neighbourhood similarity)';
    S.groups.forEach(function (g) {
      var row = el('div'), b = el('button', g.collapsed ? 'expand' : 'collapse');
      b.addEventListener('click', function () { collapse(g.name, !g.collapsed); });
      row.appendChild(b);
      var names = el('span', ' ' + g.name + ': ' + g.members.length + ' nodes' + (g.suggested ? ' (suggested)' : ''));
      names.title = g.members.map(function (m) { return N[m].id; }).join(' ');
      row.appendChild(names);
      box.appendChild(row);
    });
  }
  function collapse(name, on) {
    S.groups.forEach(function (g) { if (g.name === name) g.collapsed = on; });
    draw();
  }
  function group(ids) {
    var members = ids.filter(function (id) { return indexOf[id] !== undefined && S.drawn[id]; }).map(function (id) { return indexOf[id]; });
    if (members.length < 2) { byId('cg-card').textContent = 'select two or more nodes (ctrl-click) to group them'; return null; }
    var name = 'group' + (S.groups.length + 1);
    S.groups.push({name: name, members: members, collapsed: true, suggested: false});
    byId('cg-groups').open = true;
    draw();
    return superId(name);
  }
  function setView(v) {
    S.view = v;
    byId('cg-view').value = v;
    draw();
    fit();
  }
  network.on('afterDrawing', function (ctx) {  // row and column guides, 12 screen pixels at any zoom
    var doc = D.views[S.view], k = 1 / network.getScale();
    var guideW = doc.rows.reduce(function (m, r) { return Math.max(m, r[1].length * 7 + 20); }, 0) * k;
    var edge = network.DOMtoCanvas({x: 0, y: 0}).x, left = Math.max(S.guideX, edge + guideW);
    ctx.save();
    if (left > S.guideX) {  // panned: the row names stay at the window's left edge, over a pale band
      ctx.fillStyle = 'rgba(255,255,255,0.85)';
      ctx.fillRect(edge, doc.box[1] - 1e4, left - edge, doc.box[3] - doc.box[1] + 2e4);
    }
    ctx.font = (12 * k) + 'px sans-serif';
    ctx.fillStyle = '#666666';
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    doc.rows.forEach(function (r) { ctx.fillText(r[1], left - 6 * k, r[0]); });
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    doc.cols.forEach(function (c) { ctx.fillText(c[1], c[0], S.guideY + 4 * k); });
    ctx.restore();
  });
  network.on('hoverNode', function (p) { highlight(p.node); });
  network.on('blurNode', function () { highlight(null); });
  network.on('click', function (p) { if (p.nodes.length) show(p.nodes[0]); });
  var slider = byId('cg-view');
  slider.max = D.views.length - 1;
  slider.addEventListener('input', function () { setView(parseInt(slider.value, 10)); });
  byId('cg-go').addEventListener('click', function () { go(byId('cg-find').value.trim()); });
  byId('cg-group').addEventListener('click', function () { group(network.getSelectedNodes()); });
  byId('cg-title').textContent = D.heading;
  if (D.metric) byId('cg-metric').textContent = 'explains ' + D.metric;
  if (D.outputs) byId('cg-outputs').textContent = D.outputs;
  byId('cg-meta').textContent = D.summary;
  if (D.prompt !== null && D.heading.indexOf(D.prompt) < 0) byId('cg-prompt').textContent = 'prompt: ' + D.prompt;
  document.title = D.title;
  window.cgShow = show;
  window.cgSetView = setView;
  window.cgHighlight = highlight;
  window.cgCollapse = collapse;
  window.cgGroup = group;
  window.cgFit = fit;
  setView(D.default_view);
  network.once('afterDrawing', function () { window.cgReadyMs = performance.now(); window.cgReady = true; });
  network.redraw();
})();

"""The status page (``GET /``), its data (``/status.json``), a job's output (``/output?job=N``),
``/health`` and ``/metrics``, served by the server's own front on its port.

The page is a fixed HTML document and script: no value of the queue is ever
written into HTML by the server.  The script reads ``/status.json`` every
two seconds and builds the page with ``textContent``, so task arguments and
job output - untrusted text - always show as text.  Nothing on the page
changes the queue.  No file comes from elsewhere (no CDN).
"""
import json
import time
import urllib.parse

from .metrics import health_answer

DAY = 24 * 3600
TAIL = 2048            # bytes of a running job's output shown on the page
HISTORY_ON_PAGE = 200

PAGE = '''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Bots job queue</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;padding:1em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.05em;margin:1.2em 0 .4em}
#state{font-weight:bold;padding:.2em .6em;border-radius:4px;background:#d8f0d8;display:inline-block}
#state.paused{background:#ffe2a8} #state.down{background:#f5c2c2}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9em}
th,td{text-align:left;padding:.25em .5em;border-bottom:1px solid #e4e4e4;vertical-align:top}
td.task{font-family:monospace;word-break:break-all} pre{margin:.3em 0 0;white-space:pre-wrap;
word-break:break-all;max-height:12em;overflow:auto;background:#f3f3f3;padding:.3em;font-size:.85em}
.ok{color:#17692b} .failed,.lost,.cannot-start,.timed-out{color:#a3121b} .warning{color:#9a5b00}
#day{width:100%;height:70px;background:#fff;border:1px solid #ddd} .muted{color:#777}
@media (max-width:600px){th:nth-child(n+4),td:nth-child(n+4){display:none}}
</style></head><body>
<h1>Bots job queue</h1>
<div><span id="state">loading...</span> <span id="summary" class="muted"></span></div>
<h2>Last 24 hours</h2>
<svg id="day" viewBox="0 0 1000 70" preserveAspectRatio="none" role="img"
 aria-label="one bar per job over the last 24 hours"></svg>
<div class="muted" id="axis"></div>
<h2>Running</h2><table id="running"><thead><tr><th>Job</th><th>Task</th><th>Running for</th><th>Pid</th>
</tr></thead><tbody></tbody></table>
<h2>Waiting <span id="waitcount" class="muted"></span></h2><table id="waiting"><thead><tr><th>Job</th>
<th>Prio</th><th>Task</th><th>Note</th></tr></thead><tbody></tbody></table>
<h2>Next scheduled runs</h2><table id="schedules"><thead><tr><th>Schedule</th><th>Next run</th>
<th>When</th></tr></thead><tbody></tbody></table>
<h2>Recent jobs</h2><table id="history"><thead><tr><th>Job</th><th>Started</th><th>Took</th><th>Exit</th>
<th>Status</th><th>Task</th></tr></thead><tbody></tbody></table>
<script src="/page.js"></script>
</body></html>
'''

SCRIPT = r'''"use strict";
function el(tag, text, cls) { var e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function when(t) { if (!t) return "-"; var d = new Date(t * 1000);
  return d.toLocaleDateString() + " " + d.toLocaleTimeString(); }
function took(s) { if (s === null || s === undefined) return "-"; s = Math.round(s);
  var h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + r + "s"; }
function fill(id, rows) { var body = document.querySelector("#" + id + " tbody"); body.replaceChildren();
  rows.forEach(function (cells) { var tr = el("tr"); cells.forEach(function (c) { tr.appendChild(c); });
    body.appendChild(tr); }); if (!rows.length) { var tr = el("tr"), td = el("td", "none", "muted");
    td.colSpan = 6; tr.appendChild(td); body.appendChild(tr); } }
function kind(job) { if (job.state === "running") return "running"; if (job.exitcode === 2) return "warning";
  return (job.status || "").replace(/ /g, "-"); }
var COLOURS = {ok: "#2e9e4a", warning: "#e09a1a", running: "#2f6fd0"};
function day(data) { var svg = document.getElementById("day"), ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren(); var start = data.now - 86400;
  for (var h = 1; h < 24; h++) { var tick = document.createElementNS(ns, "line"), tx = h / 24 * 1000;
    tick.setAttribute("x1", tx); tick.setAttribute("x2", tx); tick.setAttribute("y1", 0);
    tick.setAttribute("y2", 70); tick.setAttribute("stroke", h % 6 ? "#eee" : "#ccc"); svg.appendChild(tick); }
  data.day.forEach(function (job) { var from = Math.max(job.started, start), to = job.ended || data.now;
    var w = Math.max(2, (to - from) / 86400 * 1000), x = Math.min(1000 - w, (from - start) / 86400 * 1000);
    var r = document.createElementNS(ns, "rect"); r.setAttribute("x", x); r.setAttribute("y", 8);
    r.setAttribute("width", w); r.setAttribute("height", 54); r.setAttribute("class", "bar " + kind(job));
    r.setAttribute("fill", COLOURS[kind(job)] || "#c0262f");
    var t = document.createElementNS(ns, "title");
    t.textContent = "job " + job.jobnumber + ", " + when(job.started) + ", " + took(to - job.started) + ", " +
      (job.state === "running" ? "running" : (job.status + ", exit code " + (job.exitcode === undefined ?
      "-" : job.exitcode))) + "\n" + job.task.join(" ");
    r.appendChild(t); svg.appendChild(r); });
  document.getElementById("axis").textContent = when(start) + "  ...  " + when(data.now); }
function show(data) { var state = document.getElementById("state");
  state.textContent = data.paused ? "PAUSED - no new job starts" : "running";
  state.className = data.paused ? "paused" : "";
  document.getElementById("summary").textContent = data.running.length + " running, " +
    data.waiting_count + " waiting; updated " + new Date().toLocaleTimeString();
  document.getElementById("waitcount").textContent = "(" + data.waiting_count + ")";
  fill("running", data.running.map(function (job) { var task = el("td", job.task.join(" "), "task");
    if (job.output_tail) task.appendChild(el("pre", job.output_tail));
    return [el("td", job.jobnumber), task, el("td", took(job.running_for)), el("td", job.pid)]; }));
  fill("waiting", data.waiting.map(function (job) { return [el("td", job.jobnumber), el("td", job.priority),
    el("td", job.task.join(" "), "task"), el("td", job.retry_at ? "engine database was locked; retried at " +
    when(job.retry_at) : "")]; }));
  fill("schedules", data.schedules.map(function (s) { return [el("td", s.schedule), el("td", when(s.next_run)),
    el("td", s.when)]; }));
  fill("history", data.history.map(function (job) { var link = el("a", job.jobnumber);
    link.href = "/output?job=" + encodeURIComponent(job.jobnumber); link.title = "its output";
    var first = el("td"); first.appendChild(link);
    return [first, el("td", when(job.started)), el("td", took(job.ended - job.started)),
      el("td", job.exitcode === undefined || job.exitcode === null ? "-" : job.exitcode),
      el("td", job.status, kind(job)), el("td", job.task.join(" "), "task")]; }));
  day(data); }
function refresh() { fetch("/status.json", {cache: "no-store"}).then(function (r) { return r.json(); })
  .then(show).catch(function () { var s = document.getElementById("state");
    s.textContent = "server not reachable"; s.className = "down"; })
  .finally(function () { setTimeout(refresh, 2000); }); }
refresh();
'''

HTML = 'text/html; charset=utf-8'
TEXT = 'text/plain; charset=utf-8'
JSON = 'application/json'


class StatusPages:
    """The pages, made from the running server's parts."""

    def __init__(self, service, states, store, metrics):
        self.service = service
        self.states = states          # jobstates.JobStates: the running jobs' output so far
        self.store = store
        self.metrics = metrics

    def routes(self):
        return {'/': self.page, '/page.js': self.script, '/status.json': self.status, '/output': self.output,
                '/health': self.health, '/metrics': self.exposition}

    def page(self, query):
        return 200, HTML, PAGE.encode('utf-8')

    def script(self, query):
        return 200, 'text/javascript; charset=utf-8', SCRIPT.encode('utf-8')

    def status(self, query):
        now = time.time()
        status = self.service.status(100)
        running = []
        for job in status['running']:
            job = dict(job, output_tail=self.states.output_tail(job['jobnumber'], TAIL))
            if job.get('server'):           # a shared store's job that runs at the leader
                job['pid'] = '%s at %s' % (job.get('pid', '-'), job['server'])
            running.append(job)
        retry = status.get('retry_at', {})
        waiting = [{'priority': priority, 'jobnumber': number, 'task': task, 'retry_at': retry.get(str(number))}
                   for priority, number, task in status['waiting']]
        history = [{key: record.get(key) for key in ('jobnumber', 'priority', 'task', 'started', 'ended', 'exitcode',
                                                     'status', 'schedule')}
                   for record in self.store.history(HISTORY_ON_PAGE, with_output=False)]
        day = [dict(record, state='finished') for record in history if (record['ended'] or now) >= now - DAY
               and record['started']]
        day += [{'jobnumber': job['jobnumber'], 'task': job['task'], 'started': job['started'], 'state': 'running'}
                for job in running]
        scheduler = self.service.scheduler
        upcoming = sorted((when, name) for name, when in scheduler.next_times().items())[:20] if scheduler else []
        schedules = [{'schedule': name, 'next_run': when, 'when': scheduler.schedules[name].when}
                     for when, name in upcoming if name in scheduler.schedules]
        answer = {'now': now, 'paused': status['paused'], 'running': running, 'waiting': waiting,
                  'waiting_count': status['waiting_count'], 'history': history, 'day': day, 'schedules': schedules}
        return 200, JSON, json.dumps(answer).encode('utf-8')

    def output(self, query):
        try:
            jobnumber = int(urllib.parse.parse_qs(query).get('job', [''])[0])
        except ValueError:
            return 400, TEXT, b'write /output?job=N (a job number)\n'
        job = self.service.showjob(jobnumber)
        if not job:
            return 404, TEXT, b'no job %d\n' % jobnumber
        text = job.get('output')
        if text is None:
            text = self.states.output_tail(jobnumber, 1 << 20) or '(no output yet)'
        return 200, TEXT, text.encode('utf-8', 'replace')

    def health(self, query):
        code, body = health_answer(self.service.health(), leader_only='leader' in (query or ''))
        return code, JSON, body

    def exposition(self, query):
        content_type, body = self.metrics.exposition()
        return 200, content_type, body

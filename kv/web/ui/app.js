// The live cluster page: two EventSources (they reconnect by themselves), no polling.
"use strict";

const $ = (id) => document.getElementById(id);
const FLOW_ROWS = 40;
let lastWrittenVersion = null;
let followerCount = 0;

function text(tag, content, className) {
  const element = document.createElement(tag);
  element.textContent = content;
  if (className) element.className = className;
  return element;
}

function renderFollowers(followers) {
  const list = $("followers");
  if (followers.length !== followerCount) {
    followerCount = followers.length;
    list.replaceChildren();
    const select = $("read-node");
    select.replaceChildren(text("option", "the leader"));
    select.firstChild.value = "-1";
    followers.forEach((f, i) => {
      const option = text("option", `follower ${i + 1} (${f.url})`);
      option.value = String(i);
      select.append(option);
    });
    const w = $("write-w");
    const chosen = w.value;
    w.replaceChildren();
    for (let q = 0; q <= followers.length; q++) w.append(text("option", String(q)));
  }
  followers.forEach((f, i) => {
    let card = list.children[i];
    if (!card) {
      card = document.createElement("li");
      card.className = "card";
      card.dataset.follower = String(i);
      list.append(card);
    }
    card.dataset.state = f.state;
    const rtt = f.heartbeat_rtt_ms == null ? "–" : `${f.heartbeat_rtt_ms.toFixed(1)} ms`;
    const heading = text("h3", `Follower ${i + 1} `);
    heading.append(text("span", f.state, "state"));
    const details = document.createElement("dl");
    for (const [name, value] of [["lag", `${f.lag} versions`], ["pending", `${f.pending} entries`],
                                 ["heartbeat", rtt]]) {
      details.append(text("dt", name), text("dd", String(value)));
    }
    card.replaceChildren(heading, text("p", f.url, "url"), details);
    if (f.state === "down" && f.last_error) card.append(text("p", f.last_error, "error"));
    card.setAttribute("aria-label", `Follower ${i + 1}: ${f.state}, lag ${f.lag}`);
  });
}

function renderLatency(latency) {
  const canvas = $("latency-chart");
  const context = canvas.getContext("2d");
  const entries = Object.entries(latency);
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.font = "12px system-ui, sans-serif";
  context.fillStyle = "#1b1b1b";
  if (!entries.length) {
    context.fillText("No writes yet.", 10, 20);
    $("latency-text").textContent = "";
    return;
  }
  const max = Math.max(...entries.map(([, v]) => v.mean_ms), 1);
  const width = Math.min(70, (canvas.width - 20) / entries.length);
  entries.forEach(([quorum, v], i) => {
    const height = (canvas.height - 40) * v.mean_ms / max;
    const x = 10 + i * width;
    context.fillStyle = "#1f4e99";
    context.fillRect(x + 4, canvas.height - 20 - height, width - 8, height);
    context.fillStyle = "#1b1b1b";
    context.fillText(`w=${quorum}`, x + 4, canvas.height - 5);
    context.fillText(`${v.mean_ms.toFixed(0)} ms`, x + 4, canvas.height - 24 - height);
  });
  $("latency-text").textContent = entries
    .map(([q, v]) => `w=${q}: mean ${v.mean_ms.toFixed(1)} ms over ${v.count} writes`).join("; ");
}

function renderElection(ha) {
  // HA nodes only: who leads, the term, the lease, and each change of leader.
  $("election").hidden = false;
  let summary = ha.leader_name
    ? `${ha.leader_name} leads in term ${ha.term}.`
    : `No leader: an election is under way${ha.etcd_error ? ` (${ha.etcd_error})` : ""}.`;
  summary += ha.role === "leader" && ha.lease_remaining_s != null
    ? ` This node (${ha.node_name}) holds the lease: ${ha.lease_remaining_s.toFixed(2)} s left unless renewed.`
    : ` This node is ${ha.node_name}, a ${ha.role}.`;
  $("election-summary").textContent = summary;
  $("election-action").textContent = `Last HA action here: ${ha.last_action}`;
  const leaderLine = $("election-leader");
  leaderLine.replaceChildren();
  if (ha.role !== "leader" && ha.leader_url) {
    const link = text("a", `${ha.leader_url}/ui`);
    link.href = `${ha.leader_url}/ui`;
    leaderLine.append("Writes and the followers' cards are on the leader's page: ", link);
  }
  const list = $("elections");
  list.replaceChildren(...ha.elections.slice().reverse().map((e) => {
    const when = new Date(e.at * 1000).toLocaleTimeString();
    const gap = e.vacant_s == null ? "" : ` after ${e.vacant_s.toFixed(2)} s without a leader`;
    const item = text("li", `term ${e.term}: ${e.leader} leads (seen at ${when}${gap})`);
    item.value = e.term;
    return item;
  }));
}

function renderState(state) {
  $("summary").textContent = state.role === "follower"
    ? `This node (${state.node_name}) follows; term ${state.term}, version ${state.last_version}`
    : `Leader term ${state.term}, version ${state.last_version}; default w=${state.write_quorum}; ` +
      (state.ready ? "ready" : "not ready");
  $("write-form").querySelector("button").disabled = state.role === "follower";
  $("followers-section").hidden = state.role === "follower";
  renderFollowers(state.followers);
  renderLatency(state.latency_by_quorum);
  if (state.ha) renderElection(state.ha);
}

function addFlow(d) {
  const row = document.createElement("tr");
  const follower = d.follower.replace(/^https?:\/\//, "");
  row.append(text("td", String(d.version)), text("td", d.key + (d.deleted ? " (deleted)" : "")),
             text("td", follower + (d.ok ? "" : " (not confirmed)")),
             text("td", d.delay_ms.toFixed(0), "num"), text("td", d.latency_ms.toFixed(0), "num"));
  const body = $("flow");
  body.prepend(row);
  while (body.children.length > FLOW_ROWS) body.lastChild.remove();
}

function connectFeed() {
  // The change feed: each write as the leader applies it.
  const feed = new EventSource("/watch");
  const show = (e) => {
    const entry = JSON.parse(e.data);
    const item = text("li", entry.deleted ? `v${entry.version} ${entry.key} deleted`
                                           : `v${entry.version} ${entry.key} = ${JSON.stringify(entry.value)}`);
    item.value = entry.version;
    const list = $("feed");
    list.prepend(item);
    while (list.children.length > 8) list.lastChild.remove();
  };
  feed.addEventListener("put", show);
  feed.addEventListener("delete", show);
}

function connect() {
  const events = new EventSource("/ui/api/events");
  events.addEventListener("open", () => { $("connection").textContent = "live"; });
  events.addEventListener("error", () => { $("connection").textContent = "reconnecting…"; });
  events.addEventListener("state", (e) => renderState(JSON.parse(e.data)));
  events.addEventListener("delivery", (e) => addFlow(JSON.parse(e.data)));
}

$("write-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const output = $("write-result");
  let value;
  try { value = JSON.parse($("write-value").value); } catch (error) {
    output.textContent = `The value is not JSON: ${error.message}`;
    return;
  }
  output.textContent = "Waiting for the quorum…";
  const started = performance.now();
  const response = await fetch(`/keys?w=${encodeURIComponent($("write-w").value)}`, {
    method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify({key: $("write-key").value, value}),
  });
  const body = await response.json();
  const took = (performance.now() - started).toFixed(0);
  if (response.ok) {
    lastWrittenVersion = body.version;
    const confirmed = body.replication.filter((d) => d.ok).map((d) => d.follower.replace(/^https?:\/\//, ""));
    output.textContent = `${response.status}: version ${body.version}, ${body.acks} of w=${body.write_quorum} ` +
      `confirmed in ${body.latency_ms.toFixed(0)} ms (${took} ms here)\nconfirmed by: ${confirmed.join(", ") || "nobody yet"}`;
  } else {
    output.textContent = `${response.status}: ${body.error}`;
  }
});

$("read-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const output = $("read-result");
  const params = new URLSearchParams({key: $("read-key").value, node: $("read-node").value});
  if ($("read-min").checked) {
    if (lastWrittenVersion === null) { output.textContent = "Write something first."; return; }
    params.set("min_version", String(lastWrittenVersion));
    params.set("wait_ms", "5000");
  }
  output.textContent = "Reading…";
  const response = await fetch(`/ui/api/read?${params}`);
  const body = await response.json();
  if (!response.ok) { output.textContent = `${response.status}: ${body.error}`; return; }
  const found = body.body || {};
  output.textContent = body.status === 200
    ? `${body.status} from ${body.node}: ${JSON.stringify(found.value)} (version ${found.version}; node has applied up to ${body.last_version})`
    : `${body.status ?? "no answer"} from ${body.node}: ${found.error || body.error}`;
});

connect();
connectFeed();

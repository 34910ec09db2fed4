// The held-streams client: many concurrent StreamCreate calls over a few HTTP/2 connections
// (Node's http2, cheaper per message than a Python gRPC client, so that the client is not what
// limits a run of thousands of streams).
//
// Usage: node bench/held_client.mjs '<json options>'
//   {target, body (file with the serialized request), streams, per_connection, ramp_s,
//    expect_chunks, timeout_s}
// Prints `held` once every stream has received its first delta (the runner then samples the
// server's memory, file descriptors and CPU), `ending` when the first stream ends (the CPU
// again: between the two every stream is open and relaying, the steady state), then one JSON
// line with the results.
//
// Every delta carries the upstream's write time of each chunk it holds (`tok<i>@<ns> `, from
// CLOCK_MONOTONIC, which process.hrtime.bigint() reads too): the delay of a chunk is the time
// between the upstream writing it and this client reading the gRPC message it arrived in.

import http2 from "node:http2";
import fs from "node:fs";

const opts = JSON.parse(process.argv[2]);
const body = fs.readFileSync(opts.body);
const framed = Buffer.alloc(5 + body.length);
framed.writeUInt32BE(body.length, 1);
body.copy(framed, 5);
const PATH = "/llmgateway.v1.ChatCompletionService/StreamCreate";
const AT = 0x40; // '@'
const SPACE = 0x20;

const delays = [];
// Delays while every stream is held and none has ended (between "held" and "ending"): no
// stream starting or finishing, the state the streams-held budget is about.
const steadyDelays = [];
let chunks = 0;
let ok = 0;
let failed = 0;
let firstError = "";
let started = 0;
let firsts = 0;
let finished = 0;
let heldPrinted = false;

const sessions = [];
const connections = Math.max(1, Math.ceil(opts.streams / opts.per_connection));
for (let i = 0; i < connections; i++) {
  const session = http2.connect(`http://${opts.target}`, {
    settings: { initialWindowSize: 1 << 20 },
    peerMaxConcurrentStreams: opts.per_connection,
  });
  session.on("error", (err) => fail(`session: ${err.message}`));
  sessions.push(session);
}

function fail(message) {
  if (!firstError) firstError = message.slice(0, 300);
}

function done() {
  if (finished === 0 && heldPrinted) process.stdout.write("ending\n"); // the steady state ends
  finished++;
  if (finished === opts.streams) report();
}

function onMessage(msg, state) {
  if (msg.length === 0) return;
  if (msg[0] !== 0x0a) {
    state.completion = true; // field 2: the assembled completion (holds every chunk: not timed)
    return;
  }
  const now = Number(process.hrtime.bigint());
  let found = 0;
  for (let at = msg.indexOf(AT); at >= 0; at = msg.indexOf(AT, at + 1)) {
    let ns = 0;
    let j = at + 1;
    for (; j < msg.length && msg[j] >= 0x30 && msg[j] <= 0x39; j++) ns = ns * 10 + (msg[j] - 0x30);
    if (j < msg.length && msg[j] === SPACE) {
      const us = (now - ns) / 1000; // microseconds
      delays.push(us);
      if (heldPrinted && finished === 0) steadyDelays.push(us);
      found++;
    }
  }
  state.chunks += found;
  chunks += found;
  if (!state.first && found) {
    state.first = true;
    firsts++;
    if (firsts === opts.streams && !heldPrinted) {
      heldPrinted = true;
      process.stdout.write("held\n");
    }
  }
}

function startStream(index) {
  const session = sessions[index % connections];
  const state = { chunks: 0, first: false, completion: false, pending: Buffer.alloc(0), status: null };
  let req;
  try {
    req = session.request({
      ":method": "POST",
      ":path": PATH,
      "content-type": "application/grpc",
      te: "trailers",
    });
  } catch (err) {
    failed++;
    fail(`request: ${err.message}`);
    done();
    return;
  }
  started++;
  req.on("response", (headers) => {
    // A trailers-only answer (an error before any message) has its status in the headers.
    if (headers["grpc-status"] !== undefined) {
      state.status = headers["grpc-status"];
      if (state.status !== "0") fail(`grpc-status ${state.status}: ${headers["grpc-message"] || ""}`);
    }
  });
  req.on("trailers", (headers) => {
    state.status = headers["grpc-status"];
    if (state.status !== "0") fail(`grpc-status ${state.status}: ${headers["grpc-message"] || ""}`);
  });
  req.on("data", (data) => {
    let buf = state.pending.length ? Buffer.concat([state.pending, data]) : data;
    while (buf.length >= 5) {
      const len = buf.readUInt32BE(1);
      if (buf.length < 5 + len) break;
      onMessage(buf.subarray(5, 5 + len), state);
      buf = buf.subarray(5 + len);
    }
    state.pending = buf;
  });
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    if (state.status === "0" && state.completion && state.chunks === opts.expect_chunks) ok++;
    else {
      failed++;
      if (state.status === "0")
        fail(`stream ended with ${state.chunks} of ${opts.expect_chunks} chunks, completion ${state.completion}`);
      else if (state.status === null)
        fail(`stream closed without a grpc-status (RST_STREAM code ${req.rstCode}) after ${state.chunks} chunks`);
    }
    done();
  };
  req.on("error", (err) => {
    fail(`stream: ${err.message}`);
    close();
  });
  req.on("close", close);
  req.end(framed);
}

const t0 = performance.now();
const cpu0 = process.cpuUsage();
for (let i = 0; i < opts.streams; i++) {
  setTimeout(() => startStream(i), (i * opts.ramp_s * 1000) / opts.streams);
}
const killer = setTimeout(() => {
  fail(`timed out after ${opts.timeout_s} s with ${finished} of ${opts.streams} streams finished`);
  failed += opts.streams - finished;
  report();
}, opts.timeout_s * 1000);

function pct(sorted, q) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.round((q / 100) * sorted.length) - 1));
  return sorted[i];
}

let reported = false;
function report() {
  if (reported) return;
  reported = true;
  clearTimeout(killer);
  const wall = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const sorted = Float64Array.from(delays).sort();
  const steady = Float64Array.from(steadyDelays).sort();
  const out = {
    streams: opts.streams,
    started,
    ok,
    failed,
    first_error: firstError,
    chunks,
    wall,
    cpu: (cpu.user + cpu.system) / 1e6,
    p50_us: pct(sorted, 50),
    p99_us: pct(sorted, 99),
    max_us: sorted.length ? sorted[sorted.length - 1] : null,
    steady_chunks: steady.length,
    steady_p50_us: pct(steady, 50),
    steady_p99_us: pct(steady, 99),
  };
  process.stdout.write(JSON.stringify(out) + "\n");
  for (const s of sessions) s.destroy();
  process.exit(0);
}

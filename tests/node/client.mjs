// A Node.js client of the gateway built from the .proto files alone: the proof that clients in
// other languages work. Used by tests/integration/test_clients.py.
//
//   node tests/node/client.mjs <address> <upstream_url>
//
// Runs, in order: Create (the upstream is scripted to answer with text and a tool call),
// StreamCreate (scripted as an SSE stream), Create with no messages (an INVALID_ARGUMENT), and
// CountTokens. Prints one JSON object to stdout; exits non-zero on any unexpected failure.
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = process.env.LLMGW_PROTO_ROOT ?? path.resolve(here, "..", "..", "proto");
const DEADLINE_MS = 15_000;

const [address, upstreamUrl] = process.argv.slice(2);
if (!address || !upstreamUrl) {
  console.error("usage: node client.mjs <address> <upstream_url>");
  process.exit(2);
}

// google/protobuf/*.proto (Struct here) come from proto-loader's bundled well-known types.
const definition = protoLoader.loadSync(
  ["llmgateway/v1/chat.proto", "llmgateway/v1/traces.proto", "llmgateway/v1/providers.proto"],
  { includeDirs: [PROTO_ROOT], keepCase: false, longs: String, enums: String, defaults: true, oneofs: true },
);
const pkg = grpc.loadPackageDefinition(definition).llmgateway.v1;
const chat = new pkg.ChatCompletionService(address, grpc.credentials.createInsecure());

/** A JSON value as a google.protobuf.Value message object. */
function toValue(value) {
  if (value === null) return { nullValue: "NULL_VALUE" };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  switch (typeof value) {
    case "string":
      return { stringValue: value };
    case "number":
      return { numberValue: value };
    case "boolean":
      return { boolValue: value };
    default:
      return { structValue: toStruct(value) };
  }
}

/** A JSON object as a google.protobuf.Struct message object. */
function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

function llmConfig() {
  return {
    model: "gpt-4o-mini",
    modelEndpointType: "openai",
    modelEndpoint: upstreamUrl,
    contextWindow: 128000,
    temperature: 0.2,
  };
}

const weatherFunction = {
  name: "get_weather",
  description: "Current weather of a city",
  parameters: toStruct({
    type: "object",
    properties: { city: { type: "string", description: "City name" }, days: { type: "integer" } },
    required: ["city"],
  }),
};

function unary(method, request) {
  return new Promise((resolve, reject) => {
    chat[method](request, { deadline: deadline() }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function describeError(err) {
  const details = err.metadata?.get("grpc-status-details-bin") ?? [];
  return {
    code: err.code,
    codeName: grpc.status[err.code],
    details: err.details,
    hasStatusDetails: details.length > 0,
  };
}

async function create() {
  const response = await unary("Create", {
    llmConfig: llmConfig(),
    messages: [
      { role: "ROLE_SYSTEM", content: "You are a weather bot." },
      { role: "ROLE_USER", content: "Weather in Paris?", name: "alice" },
    ],
    functions: [weatherFunction],
    functionCall: "auto",
    trace: { stepId: "step-node-1", agentId: "agent-node", callType: "agent_step", tags: ["node"] },
  });
  return response;
}

function streamCreate() {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = chat.StreamCreate(
      {
        llmConfig: llmConfig(),
        messages: [{ role: "ROLE_USER", content: "Stream, please" }],
        functions: [weatherFunction],
      },
      { deadline: deadline() },
    );
    call.on("data", (message) => {
      // With `oneofs: true`, `event` names the member that is set.
      events.push({ event: message.event, [message.event]: message[message.event], providerTraceId: message.providerTraceId });
    });
    call.on("error", reject);
    call.on("end", () => resolve(events));
  });
}

async function invalidCreate() {
  try {
    await unary("Create", { llmConfig: llmConfig(), messages: [] });
    return { unexpected: "Create with no messages succeeded" };
  } catch (err) {
    return describeError(err);
  }
}

async function main() {
  const result = {};
  result.create = await create();
  result.stream = await streamCreate();
  result.invalid = await invalidCreate();
  result.countTokens = await unary("CountTokens", {
    llmConfig: llmConfig(),
    messages: [{ role: "ROLE_USER", content: "How many tokens is this?" }],
    functions: [weatherFunction],
  });
  process.stdout.write(JSON.stringify(result) + "\n");
}

try {
  await main();
} catch (err) {
  console.error("node client failed:", err.code !== undefined ? JSON.stringify(describeError(err)) : err);
  process.exitCode = 1;
} finally {
  chat.close();
}

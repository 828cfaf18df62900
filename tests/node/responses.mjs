// The official openai Node SDK against the gateway's /v1/responses, as an application
// written for it calls it. Driven by tests/gateway/test_responses_node.py:
//
//     node tests/node/responses.mjs BASE_URL MODEL
//
// Prints one JSON line of what it saw; exits non-zero on the first failed check.
import assert from "node:assert/strict";
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey: "unused", maxRetries: 0 });
const seen = {};

// Plain text.
const plain = await client.responses.create({ model, input: "What is the capital of France?" });
assert.equal(plain.object, "response");
assert.equal(plain.status, "completed");
assert.ok(plain.output_text.length > 0);
assert.ok(plain.usage.total_tokens === plain.usage.input_tokens + plain.usage.output_tokens);
seen.plain = plain.output_text;

// Instructions and message items.
const framed = await client.responses.create({
  model,
  instructions: "Answer briefly.",
  input: [{ role: "user", content: [{ type: "input_text", text: "Say hello." }] }],
});
assert.equal(framed.instructions, "Answer briefly.");
seen.instructions_input_tokens = framed.usage.input_tokens;

// Streaming: the events in order, the final response equal to the deltas.
const stream = await client.responses.create({ model, input: "Count to three.", stream: true });
const types = [];
let deltas = "";
let final = null;
let expected = 0;
for await (const event of stream) {
  assert.equal(event.sequence_number, expected++);
  types.push(event.type);
  if (event.type === "response.output_text.delta") deltas += event.delta;
  if (event.type === "response.completed") final = event.response;
}
assert.deepEqual(types.slice(0, 4), [
  "response.created",
  "response.in_progress",
  "response.output_item.added",
  "response.content_part.added",
]);
assert.deepEqual(types.slice(-4), [
  "response.output_text.done",
  "response.content_part.done",
  "response.output_item.done",
  "response.completed",
]);
assert.equal(final.output_text ?? final.output[0].content[0].text, deltas);
seen.stream_events = types.length;

// A two-turn chain, retrieved; input items listed.
const first = await client.responses.create({ model, input: "alpha beta" });
const second = await client.responses.create({
  model,
  input: "gamma",
  previous_response_id: first.id,
});
assert.equal(second.previous_response_id, first.id);
assert.ok(second.usage.input_tokens > first.usage.input_tokens);
const got = await client.responses.retrieve(second.id);
assert.equal(got.id, second.id);
const items = await client.responses.inputItems.list(second.id, { order: "asc" });
assert.deepEqual(
  items.data.map((i) => i.role),
  ["user", "assistant", "user"],
);
seen.chain = [first.id, second.id];

// Delete, then 404s as the SDK's NotFoundError.
await client.responses.delete(first.id);
for (const call of [
  () => client.responses.retrieve(first.id),
  () => client.responses.create({ model: "no-such-model", input: "hi" }),
]) {
  await assert.rejects(call, (err) => err instanceof OpenAI.NotFoundError && err.status === 404);
}
seen.not_found = 2;

console.log(JSON.stringify(seen));

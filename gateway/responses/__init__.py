"""The Responses API (`/v1/responses`): OpenAI's newer surface, served by translating to chat
completions, with the conversation state kept by the gateway.

    protocol.py   the request's wire model and the fields the route takes
    translate.py  a Responses request (+ the stored turns before it) → a chat body; a chat
                  completion → a Response object; ids
    events.py     an engine's chat SSE chunks → the Responses event sequence
    store.py      stored responses per API key: memory (one process) or Redis, TTL and a
                  size bound per key

Why translation for every engine (embedded, vLLM, LMDeploy, openai upstreams, simulator):
every engine already serves chat completions with the gateway's whole path (limits, the
ledger, routing, retries, metrics), and chaining and scoping are the gateway's either way;
a native relay would keep reasoning items of engines that have them, which no engine here
produces. The route itself is `gateway.api.responses`; what each engine cannot do is in
docs/engines.md.
"""

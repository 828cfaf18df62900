"""The upstream hop to OpenAI-compatible workers: the relaying engine (`engine`), its
HTTP/1.1 client (`http1`), SSE splitting (`sse`) and slow-path relay (`relay`), endpoints
and their health (`endpoints`), routing plugins (`routing/`), LoRA fan-out (`adapters`),
error normalisation (`errors`), metrics-text parsing (`prom_text`), and its options."""

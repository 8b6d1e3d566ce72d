"""Schemathesis hooks for the OpenAPI fuzz (tests/reliability/test_fuzz_openapi.py).

Two changes to generated bodies of the generation routes, so that a CPU-only run stays short and
reaches past the model lookup: `max_tokens` is capped (a fuzzed request may otherwise ask for the
whole context, minutes of decoding on CPU), and two thirds of the `model` strings are replaced by a
real id (the base or the served adapter), so that templating, tokenizing and sampling get the
fuzzed messages, prompts and parameters. Invalid values (wrong types, negatives) are left alone.
"""
import schemathesis

GENERATE = ("/v1/chat/completions", "/v1/completions")
KNOWN = ("smollm2", "ft:smollm2:qv")
CAP = 4


@schemathesis.hook
def map_body(ctx, body):
    if ctx.operation.path not in GENERATE or not isinstance(body, dict):
        return body
    body = dict(body)
    model = body.get("model")
    if isinstance(model, str) and len(model) % 3 != 2:
        body["model"] = KNOWN[len(model) % 3]
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > CAP:
            body[key] = CAP
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = CAP
    return body

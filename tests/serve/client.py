"""Talks to `logitprobe serve` through OpenAI's own Python client, as users' tools do.

Usage: client.py MODE BASE_URL MODEL < request.json; prints one JSON object.
Modes:
  calls   completions and chat, streamed and not, with logprobs (the request says which)
  score   echo scoring of token-id prompts (max_tokens 0 and 1), as evaluation harnesses do
  load    many concurrent clients with mixed settings; seeded requests checked against
          the same request run alone first
  drop    clients that open a stream and leave after a few chunks
"""

import asyncio
import json
import os
import sys

import openai
from openai import AsyncOpenAI, OpenAI

mode, base, model = sys.argv[1], sys.argv[2], sys.argv[3]
req = json.load(sys.stdin)
key = os.environ.get("SERVE_KEY", "unused")


def completion_out(c):
    lp = c.logprobs
    return {
        "text": c.text,
        "finish_reason": c.finish_reason,
        "tokens": lp.tokens if lp else None,
        "token_logprobs": lp.token_logprobs if lp else None,
        # As [token, logprob] pairs, in the order the server sent them.
        "top_logprobs": [list(d.items()) if d is not None else None for d in lp.top_logprobs]
        if lp
        else None,
        "text_offset": lp.text_offset if lp else None,
        "probe": (c.model_extra or {}).get("probe"),
    }


def chat_out(c):
    content = c.logprobs.content if c.logprobs else None
    return {
        "text": c.message.content,
        "finish_reason": c.finish_reason,
        "tokens": [t.token for t in content] if content is not None else None,
        "token_logprobs": [t.logprob for t in content] if content is not None else None,
        "top_logprobs": [[(x.token, x.logprob) for x in t.top_logprobs] for t in content]
        if content is not None
        else None,
        "bytes": [t.bytes for t in content] if content is not None else None,
    }


def calls():
    cli = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    out = {}
    p = req["prompt"]
    n = req["max_tokens"]
    k = req["top"]
    r = cli.completions.create(model=model, prompt=p, max_tokens=n, temperature=0, logprobs=k)
    out["completion"] = completion_out(r.choices[0])
    out["usage"] = r.usage.model_dump()
    # Streamed: the pieces joined must equal the whole.
    text, toks, lps, tops = "", [], [], []
    finish = None
    for chunk in cli.completions.create(
        model=model, prompt=p, max_tokens=n, temperature=0, logprobs=k, stream=True
    ):
        c = chunk.choices[0]
        text += c.text
        if c.logprobs:
            toks += c.logprobs.tokens
            lps += c.logprobs.token_logprobs
            tops += [list(d.items()) for d in c.logprobs.top_logprobs]
        finish = c.finish_reason or finish
    out["completion_stream"] = {
        "text": text,
        "tokens": toks,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "finish_reason": finish,
    }
    msgs = [{"role": "user", "content": p}]
    r = cli.chat.completions.create(
        model=model, messages=msgs, max_tokens=n, temperature=0, logprobs=True, top_logprobs=k
    )
    out["chat"] = chat_out(r.choices[0])
    text, toks, lps = "", [], []
    finish = None
    for chunk in cli.chat.completions.create(
        model=model,
        messages=msgs,
        max_tokens=n,
        temperature=0,
        logprobs=True,
        top_logprobs=k,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if not chunk.choices:
            out["chat_stream_usage"] = chunk.usage.model_dump()
            continue
        c = chunk.choices[0]
        text += c.delta.content or ""
        if c.logprobs and c.logprobs.content:
            toks += [t.token for t in c.logprobs.content]
            lps += [t.logprob for t in c.logprobs.content]
        finish = c.finish_reason or finish
    out["chat_stream"] = {"text": text, "tokens": toks, "token_logprobs": lps, "finish_reason": finish}
    if "probe" in req:
        r = cli.completions.create(
            model=model, prompt=p, max_tokens=n, extra_body={"probe": True}, **req["probe"]
        )
        out["probe"] = completion_out(r.choices[0])
    return out


def score():
    cli = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    out = {}
    for max_tokens in (0, 1):
        r = cli.completions.create(
            model=model,
            prompt=req["prompts"],
            max_tokens=max_tokens,
            echo=True,
            logprobs=1,
            temperature=0,
        )
        out[str(max_tokens)] = [
            {"token_logprobs": c.logprobs.token_logprobs, "tokens": c.logprobs.tokens}
            for c in sorted(r.choices, key=lambda c: c.index)
        ]
    return out


async def one(cli, spec):
    """Runs one request of the load mix; returns its text."""
    kw = dict(model=model, max_tokens=spec["max_tokens"], temperature=spec["temperature"], seed=spec["seed"])
    if spec["top_p"] is not None:
        kw["top_p"] = spec["top_p"]
    if spec["chat"]:
        msgs = [{"role": "user", "content": spec["prompt"]}]
        if spec["stream"]:
            text = ""
            async for chunk in await cli.chat.completions.create(messages=msgs, stream=True, **kw):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return text
        r = await cli.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=2, **kw)
        return r.choices[0].message.content
    if spec["stream"]:
        text = ""
        async for chunk in await cli.completions.create(prompt=spec["prompt"], stream=True, **kw):
            text += chunk.choices[0].text
        return text
    r = await cli.completions.create(prompt=spec["prompt"], logprobs=3, **kw)
    return r.choices[0].text


async def load():
    specs = req["specs"]
    cli = AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
    # Alone first: the reference each seeded request must reproduce under load.
    alone = [await one(cli, s) for s in specs]
    clients, per = req["clients"], req["per_client"]
    errors = []

    async def client(c):
        got = []
        for j in range(per):
            i = (c * per + j) % len(specs)
            try:
                got.append((i, await one(cli, specs[i])))
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                errors.append(f"{type(e).__name__}: {e}")
        return got

    results = await asyncio.gather(*(client(c) for c in range(clients)))
    mismatches = [i for got in results for i, text in got if text != alone[i]]
    return {
        "requests": sum(len(g) for g in results),
        "errors": errors[:5],
        "n_errors": len(errors),
        "mismatches": len(mismatches),
    }


async def drop():
    cli = AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)

    async def leave(i):
        stream = await cli.completions.create(
            model=model, prompt=f"story {i}", max_tokens=req["max_tokens"], stream=True, temperature=1.0
        )
        n = 0
        async for _ in stream:
            n += 1
            if n >= 2:
                break
        await stream.close()
        return n

    got = await asyncio.gather(*(leave(i) for i in range(req["clients"])))
    return {"chunks": got}


if mode == "calls":
    res = calls()
elif mode == "score":
    res = score()
elif mode == "load":
    res = asyncio.run(load())
elif mode == "drop":
    res = asyncio.run(drop())
else:
    raise SystemExit(f"unknown mode {mode}")
res["openai_version"] = openai.__version__
print(json.dumps(res))

"""Another Ray job calls the app through a Serve handle, with the same pydantic types as HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import TINY_NAME

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray import serve
    from serving.protocol import ChatCompletionRequest, CompletionRequest

    ray.init(address=sys.argv[1], log_to_driver=False)
    handle = serve.get_app_handle("llm")
    req = CompletionRequest(model=sys.argv[2], prompt="The quick brown fox", max_tokens=10, temperature=0,
                            cache={"skip": True, "no_store": True})
    whole = handle.generate.remote(req).result(timeout_s=120)
    chunks = list(handle.options(stream=True).generate.remote(req.model_copy(update={"stream": True})))
    chat = handle.generate.remote(ChatCompletionRequest(
        model=sys.argv[2], messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    ).result(timeout_s=120)
    print(json.dumps({
        "text": whole.choices[0].text, "usage": whole.usage.completion_tokens,
        "streamed": "".join(c.choices[0].text for c in chunks if c.choices),
        "finish": [c.choices[0].finish_reason for c in chunks if c.choices][-1],
        "chat_type": type(chat).__name__,
    }))
    ray.shutdown()
""")


def test_second_process_calls_app_handle(llm_app, ray_cluster):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ray_cluster, TINY_NAME], capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["usage"] == 10 and out["text"]
    assert out["streamed"] == out["text"]
    assert out["finish"] == "length"
    assert out["chat_type"] == "ChatCompletionResponse"

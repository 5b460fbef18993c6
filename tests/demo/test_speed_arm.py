import json

import torch

from lowbit.demo.speed_arm import run_speed_arm
from lowbit.models import build_model


def test_run_speed_arm_writes_markdown_rows_and_plot(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", num_layers=1).eval()
    res = run_speed_arm(model, "4w", tmp_path, modes=("eager",), prompt_len=4, decode_tokens=2, repeats=1,
                        log=lambda *_: None)
    rows = [(r["scheme"], r["mode"]) for r in res["rows"]]
    assert rows == [("none", "eager"), ("4w(group_size=128)", "eager")]  # labelled with the group size used
    assert res["markdown"].count("\n| ") == 3
    assert "| 4w(group_size=128) | eager | bfloat16 |" in res["markdown"]
    assert (tmp_path / "decode_tok_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "speed.json").read_text())["rows"][1]["scheme"] == "4w(group_size=128)"
    # the float model handed in is not modified (each arm quantizes a copy)
    assert type(model.layers[0].attn.q_proj.weight) is torch.nn.Parameter

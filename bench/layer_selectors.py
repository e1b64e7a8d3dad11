"""The softmax-layer selectors at equal cost: the layers each picks, its seconds, and the student each choice
gives after the demo's two stages.

    python bench/layer_selectors.py --out checkpoints/selectors
    python bench/layer_selectors.py --out checkpoints/selectors --selectors recall layer_kl --reuse transfer_probe=RUN

Every selector scores the 30 layers of the demo's teacher with the same probe budget
(`attention.selection_steps` of the demo config). Then each distinct choice is trained as the demo is
(40 transfer + 30 LoRA steps of 512 tokens, KL-first) and evaluated as bench/chat_frame.py evaluates
(closeness on news, code and the manual; passkey and badge recall; agreement short and after 256 and 1,024
tokens). `--reuse SELECTOR=RUN` takes a finished run with that selector's choice instead of training it again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.chat_frame import BASE, EVALUATE, row  # noqa: E402  (the same start, evaluation and table cells)


def choose(config: str, selector: str, scratch: Path) -> tuple[list[int], float]:
    """(layers, seconds) for `selector` on the demo config; the probe's data cache goes to `scratch`."""
    from stages.config_loader import load_config
    from stages.layer_choice import choose_softmax_layers

    cfg = load_config(config, [*BASE, f"attention.softmax_layer_selector={selector}"])
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = choose_softmax_layers(cfg, scratch)
    return sorted(record["choice"]), time.time() - started


def train(config: str, out: Path, selector: str, layers: list[int]) -> float:
    cmd = [str(REPO / ".venv/bin/linearize"), "run", config, f"run_name={selector}", f"output_dir={out}",
           "stages=[attention_transfer,lora_recovery,evaluate]", f"attention.softmax_layers=[{','.join(map(str, layers))}]",
           *BASE, *EVALUATE]
    started = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - started


def main(argv=None) -> int:
    from linearize.train.layer_choice import SELECTORS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    parser.add_argument("--selectors", nargs="+", default=list(SELECTORS), choices=list(SELECTORS))
    parser.add_argument("--reuse", nargs="*", default=[], metavar="SELECTOR=RUN")
    parser.add_argument("--choose-only", action="store_true", help="print the layers and seconds; train nothing")
    args = parser.parse_args(argv)
    reuse = dict(item.split("=", 1) for item in args.reuse)
    args.out.mkdir(parents=True, exist_ok=True)
    choices_file = args.out / "choices.json"
    choices = json.loads(choices_file.read_text()) if choices_file.exists() else {}
    for selector in args.selectors:
        if selector not in choices:
            layers, seconds = choose(args.config, selector, args.out / "_probe" / selector)
            choices[selector] = {"layers": layers, "seconds": seconds}
            choices_file.write_text(json.dumps(choices, indent=1))
        print(f"{selector}: layers {choices[selector]['layers']} in {choices[selector]['seconds']:.0f} s", flush=True)
    if args.choose_only:
        return 0
    rows = []
    for selector in args.selectors:
        run = Path(reuse[selector]) if selector in reuse else args.out / selector
        seconds = 0.0 if selector in reuse else train(args.config, args.out, selector, choices[selector]["layers"])
        pick = choices[selector]
        rows.append(row(f"{selector} {pick['layers']} ({pick['seconds']:.0f} s)", run, seconds))
        print("\n".join(rows), flush=True)
    print("\n| selector, layers (choice s) | news ppl × teacher | KL news / code / manual | news top-1 | passkey @512 | "
          "badge @512 | agreement short | after 256 tokens (prefix) | after 1,024 tokens (prefix) | "
          "first-token KL short / 256 / 1,024 | run min |")
    print("|" + "---|" * 11)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which step adds a shape guard on the batch size on CUDA (issue 14): the decode sequence, guards per step.

HF Llama (d=2048, 8 layers, GQA 16/4, sdpa, bf16), T=1, batch sizes 1, 3, 8, 13, 24, 40, each called
positionally and by keyword; prints Dynamo's graph count per backend and every guard the kernelpytorch
steps added (``guards_added`` in the report).
"""

import sys

import torch
import transformers

from kp_compiler.core.report import collect
from kp_compiler.testing import hf


def main(size: str = "decode", backends: str = "inductor,kernelpytorch") -> int:
    from torch._dynamo.utils import counters

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}")
    torch._logging.set_logs(recompiles=True)
    model, vocab = hf.build("llama", size, attn="sdpa")
    model = model.to(dev, torch.bfloat16)
    for backend in backends.split(","):
        torch._dynamo.reset()
        counters.clear()
        f = torch.compile(model, backend=backend)
        with collect() as records, torch.no_grad():
            for b in (1, 3, 8, 13, 24, 40):
                ids = torch.randint(0, vocab, (b, 1), device=dev)
                f(ids)
                f(input_ids=ids)
        print(f"{backend}: unique graphs {counters['stats']['unique_graphs']}")
        for r in records:
            print(f"  graph {r.id}: passes {[(p.name, p.matches) for p in r.passes]} guards_added {r.guards_added}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

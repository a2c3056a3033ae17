import torch, sys
from torch.profiler import profile, ProfilerActivity
from bench.cases import attention as cases
from bench.cases import Scale
torch.manual_seed(0)
B,H,S,D=4,16,4096,128
mk=lambda h: torch.randn(B,h,S,D,device="cuda",dtype=torch.bfloat16)
q,k,v=mk(H),mk(H),mk(H)
kg,vg=mk(4),mk(4)
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
bm=create_block_mask(lambda b,h,qi,ki:(ki<=qi)&(qi-ki<1024),None,None,S,S,device="cuda")
ref_flex=lambda q,k,v: flex_attention(q,k,v,block_mask=bm)
runs={
 "eager-sdpa-causal": (cases.sdpa_causal, None, (q,k,v)),
 "inductor-sdpa-causal": (cases.sdpa_causal, "inductor", (q,k,v)),
 "kp-naive-causal": (cases.causal, "kernelpytorch", (q,k,v)),
 "kp-gqa-causal": (cases.gqa_causal, "kernelpytorch", (q,kg,vg)),
 "inductor-ref-flex-window": (ref_flex, "inductor", (q,k,v)),
 "kp-naive-window": (cases.make_sliding_window(1024), "kernelpytorch", (q,k,v)),
}
for name,(fn,be,args) in runs.items():
    torch._dynamo.reset()
    f = torch.compile(fn, backend=be) if be else fn
    with torch.no_grad():
        for _ in range(3): f(*args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(10): f(*args)
            torch.cuda.synchronize()
    print("=====", name)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=90))

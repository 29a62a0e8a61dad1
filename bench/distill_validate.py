"""Validation for distillation changes, apart from bench/distill.py's held-apart questions: distil a memory set of
other invented people (seed 1, not the bench's seed 0) for a fixed number of steps and ask questions written here
(none are the bench's held-apart paraphrases, none come from the question generator). Prints a JSON line and writes
the per-question rows to --out. Compare changes one at a time at equal --steps:

    .venv/bin/python bench/distill_validate.py --steps 80 --tag base --kw '{"lr": 2e-3}' --out /tmp/base.json
"""
import argparse, json, statistics, sys, time
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import kvmem, _common
from distill import memory_set, kl

VAL = (("Where does {name} reside?", "city"), ("Where is {name} based?", "city"),
       ("In what town is {name} living these days?", "city"),
       ("What is {name}'s occupation?", "job"), ("What kind of work does {name} do?", "job"),
       ("What is the profession of {name}?", "job"))
OTHER = ("What is the capital of Italy?", "Name a musical instrument with strings.", "How many minutes are in an hour?",
         "What do cows drink?", "Write a sentence about winter.", "What is 9 times 4?", "Who was Albert Einstein?",
         "What colour is grass?")


def main(argv=None):
    p = argparse.ArgumentParser(description="Distillation validation on questions of its own (see the module doc).")
    p.add_argument("--steps", type=int, default=80); p.add_argument("--tag", default="base")
    p.add_argument("--kw", default="{}", help="JSON of kvmem.distill keyword options over the defaults below")
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON file for the per-question rows (default: none written)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 facts, 2 steps")
    a = p.parse_args(argv)
    if a.quick:
        a.facts, a.steps = 2, 2
    torch.set_num_threads(1); torch.manual_seed(0)
    model, tok = _common.load_model("smollm2")
    mm = kvmem.wrap(model, tok)
    people = memory_set(a.facts, seed=1)
    texts = [x["text"] for x in people]
    # the settings of the validation table's first runs (kvmem's defaults then), so its rows stay comparable
    kw = dict(rank=8, lr=2e-3, questions_per_memory=16, max_answer_tokens=24, content_weight=3.0, keep_share=0.2,
              seed=0, lr_schedule="constant", grounded=False, weight_average=0.0,
              precision="float32", content_temperature=1.0, keep_answers="greedy")
    kw.update(json.loads(a.kw))
    t0 = time.perf_counter()
    ad = kvmem.distill(mm.adapters.base, tok, texts, steps=a.steps, progress=False, **kw)
    wall = time.perf_counter() - t0
    run = ad.meta["distill"]
    qs = [(i, q.format(name=x["name"]), x[k], k) for i, x in enumerate(people) for q, k in VAL]
    prompts = [q for _, q, _, _ in qs]
    cubes = [mm.build_cube(t) for t in texts]
    ans_c = mm.answer(prompts, cubes=[[cubes[i]] for i, _, _, _ in qs], max_new_tokens=24)
    ans_a = mm.answer(prompts, adapter=ad, max_new_tokens=24)
    rows = [dict(q=q, exp=e, kind=k, cube=e.lower() in c.lower(), ad=e.lower() in d.lower(), ans=d)
            for (i, q, e, k), c, d in zip(qs, ans_c, ans_a)]
    right = [r for r in rows if r["cube"]]
    # damage: mean KL(base||adapter) over base's 10-token greedy answers
    from distill import damage
    harm = damage(mm, ad, OTHER, tokens=10)
    res = dict(tag=a.tag, steps=run["steps"], wall_s=round(wall, 1), kw=kw,
               train_s=None, examples=run["examples"], loss_first=run["losses"][0], loss_last=statistics.mean(run["losses"][-10:]),
               cube_acc=statistics.mean(r["cube"] for r in rows), ad_acc=statistics.mean(r["ad"] for r in rows),
               ad_where_cube=statistics.mean(r["ad"] for r in right),
               city=f'{sum(r["ad"] for r in right if r["kind"]=="city")}/{sum(1 for r in right if r["kind"]=="city")}',
               job=f'{sum(r["ad"] for r in right if r["kind"]=="job")}/{sum(1 for r in right if r["kind"]=="job")}',
               damage=statistics.mean(h["kl_mean"] for h in harm), seconds_meta=run["seconds"])
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(res=res, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

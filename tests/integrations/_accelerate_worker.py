"""One rank of `accelerate launch --num_processes 2 --cpu` running RatioGRPOTrainer (test_trl_distributed.py).

argv: model_dir out_dir. Part A: a fixed global batch of 8 rows split over the ranks; each rank's
compute_loss + the averaged gradients (what DDP does) must equal ratiorl's objective on the whole
batch in one process. Part B: one real training step (generation, rewards, advantages, update)
with SNIB; the ranks record what compute_loss saw. Rank 0 writes results.json.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

G, B_GLOBAL, P, T = 2, 8, 4, 7


def reward(completions, **kwargs):
    return [float(sum(map(ord, c)) % 7) for c in completions]


def make_trainer(model_dir, out_dir, objective, **cfg):
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import GRPOConfig

    from ratiorl.integrations.trl import RatioGRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tok.padding_side = "left"
    base = dict(output_dir=out_dir, report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, num_generations=G, max_completion_length=8, save_strategy="no",
                logging_strategy="no", disable_tqdm=True, disable_dropout=True, seed=0, data_seed=0)
    base.update(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RatioGRPOTrainer(model=GPT2LMHeadModel.from_pretrained(model_dir), reward_funcs=reward,
                                args=GRPOConfig(**base), processing_class=tok, objective=objective,
                                train_dataset=Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+6=", "7+8="] * 4}))


def global_batch(trainer, vocab):
    gen = torch.Generator().manual_seed(123)  # the same on every rank
    prompt_mask = torch.ones(B_GLOBAL, P, dtype=torch.long)
    lengths = torch.tensor([7, 7, 6, 7, 1, 2, 1, 3])  # rank 0 holds far more tokens than rank 1
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(3, vocab, (B_GLOBAL, P), generator=gen),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, vocab, (B_GLOBAL, T), generator=gen) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.randn(B_GLOBAL, generator=gen),
        "group_ids": torch.arange(B_GLOBAL) // G,
    }
    with torch.no_grad():
        logp = full_logp(trainer, batch)
    batch["old_per_token_logps"] = logp + 0.2 * torch.randn(B_GLOBAL, T, generator=gen)
    return batch


def full_logp(trainer, b):
    return trainer._get_per_token_logps_and_entropies(
        trainer.model, torch.cat([b["prompt_ids"], b["completion_ids"]], 1),
        torch.cat([b["prompt_mask"], b["completion_mask"]], 1), T)[0]


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def part_a(model_dir, out_dir, rank, world):
    import ratiorl

    res = {}
    for preset in ("dapo", "grpo", "snib"):
        obj = ratiorl.objective(preset, beta=0.0)
        trainer = make_trainer(model_dir, out_dir, obj)
        model = trainer.model
        model.train()
        b = global_batch(trainer, model.config.vocab_size)
        rows = slice(rank * B_GLOBAL // world, (rank + 1) * B_GLOBAL // world)
        local = {k: v[rows] for k, v in b.items()}
        local["num_items_in_batch"] = b["completion_mask"].sum()  # TRL: gathered over the ranks
        model.zero_grad()
        loss = trainer.compute_loss(model, local)
        loss.backward()
        g = grads(model)
        dist.all_reduce(g)
        g /= world  # DDP averages the ranks' gradients
        # one process, the whole batch, ratiorl's own default (global) counts
        model.zero_grad()
        mask = b["completion_mask"].float()
        ref = obj(full_logp(trainer, b), b["old_per_token_logps"], b["advantages"], mask, group_ids=b["group_ids"])
        ref.loss.backward()
        g_ref = grads(model)
        # what local counts would give (the bug this guards against)
        model.zero_grad()
        lo = obj(full_logp(trainer, local), local["old_per_token_logps"], local["advantages"],
                 local["completion_mask"].float(), group_ids=local["group_ids"])
        lo.loss.backward()
        g_local = grads(model)
        dist.all_reduce(g_local)
        g_local /= world
        res[preset] = dict(max_diff=float((g - g_ref).abs().max()), scale=float(g_ref.abs().max()),
                           local_counts_diff=float((g_local - g_ref).abs().max()))
    return res


def part_b(model_dir, out_dir, rank, world):
    import ratiorl

    trainer = make_trainer(model_dir, out_dir, ratiorl.objective("snib", beta=0.0), max_steps=1,
                           learning_rate=1e-2, steps_per_generation=1, scale_rewards="none")
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **kw):
        seen.append({k: inputs[k].clone() for k in ("group_ids", "prompt_ids", "completion_mask")}
                    | {"num_items_in_batch": int(inputs["num_items_in_batch"])})
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = recording
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])
    trainer.train()
    after = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    out = []
    for s in seen:
        local_tokens = torch.tensor(int(s["completion_mask"].sum()))
        total = local_tokens.clone()
        dist.all_reduce(total)
        ids = [None] * world
        dist.all_gather_object(ids, s["group_ids"].tolist())
        whole = all(int((s["group_ids"] == g).sum()) == G for g in s["group_ids"].unique())
        same_prompt = all(bool((s["prompt_ids"][s["group_ids"] == g] == s["prompt_ids"][s["group_ids"] == g][0]).all())
                          for g in s["group_ids"].unique())
        out.append(dict(rows=len(s["group_ids"]), whole_groups=whole, same_prompt=same_prompt,
                        num_items=s["num_items_in_batch"], global_tokens=int(total),
                        disjoint=not (set(ids[0]) & set(ids[1]))))
    checks = torch.stack([after.sum(), (after - before).abs().sum()])
    allc = [None] * world
    dist.all_gather_object(allc, checks.tolist())
    return dict(micro_batches=out, weights_equal_across_ranks=allc[0][0] == allc[1][0], moved=allc[0][1] > 0,
                global_step=trainer.state.global_step)


def main():
    from accelerate import PartialState

    model_dir, out_dir = sys.argv[1], sys.argv[2]
    state = PartialState(cpu=True)  # as TRL's use_cpu=True; the first PartialState fixes the shared state
    rank, world = dist.get_rank(), dist.get_world_size()
    assert state.num_processes == world, (state.num_processes, world, state.distributed_type)
    torch.manual_seed(0)
    res = {"world": world, "backend": str(state.backend), "a": part_a(model_dir, out_dir, rank, world),
           "b": part_b(model_dir, out_dir, rank, world)}
    if rank == 0:
        with open(f"{out_dir}/results.json", "w") as f:
            json.dump(res, f)
    dist.barrier()


if __name__ == "__main__":
    main()
    # leave without the interpreter's teardown, as ratiorl's own CLI does under torchrun: a rank of
    # a gloo job aborted there now and then ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

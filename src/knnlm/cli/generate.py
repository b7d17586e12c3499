"""`knnlm generate`: continuations of prompts by the kNN-LM (--datastore) or MLP-LM (--mlp_memory), optionally next to
the plain LM's (--compare)."""
from __future__ import annotations

import time

from ..config import add_command, resolve, save_config, to_dict
from ..fileio import claim_output_dir
from .macondo import RESULT_FILES


def register(sub) -> None:
    from ..augmented import AugmentArgs, GenerateArgs
    from ..knn import KNNArgs
    from ..models import ModelArgs

    p = add_command(sub, "generate", (ModelArgs, AugmentArgs, KNNArgs, GenerateArgs), cmd_generate,
                    help="generate text with the kNN-LM / MLP-LM (model.generate: greedy, sampling, beam search), "
                         "optionally next to the plain LM")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat the flag for several)")


def cmd_generate(args) -> int:
    from ..augmented import AugmentArgs, GenerateArgs, augment_from_args, generate_continuations, read_prompts
    from ..datastore import Datastore
    from ..errors import KnnlmError
    from ..knn import KNNArgs
    from ..models import ModelArgs, load_model
    from ..report import finish_outputs, markdown_table

    margs, aargs, kargs, gargs = resolve([ModelArgs, AugmentArgs, KNNArgs, GenerateArgs], args, args.config)
    prompts, skipped = read_prompts(args.prompt, gargs.prompt_file, gargs.skip_bad_rows)
    if not aargs.datastore and not aargs.mlp_memory and not gargs.compare:
        raise KnnlmError("--datastore/--mlp_memory: give one (the memory to generate with), or --compare true to "
                         "see the plain LM alone")
    kargs.refuse_inactive(bool(aargs.datastore), bool(aargs.mlp_memory))
    if aargs.datastore:
        Datastore.open(aargs.datastore)  # a missing or truncated store is reported before the model loads
    # what the results are made from: a rerun of other settings replaces them only with --overwrite
    inputs = {**{k: v for k, v in to_dict(margs, aargs, kargs, gargs).items()
                 if k not in ("output_dir", "device", "overwrite")},
              "prompts": prompts}
    if aargs.datastore and kargs.stateful and gargs.num_beams > 1:
        raise KnnlmError(f"--num_beams: RetoMaton / --skip_search_prob follow one path per sequence, not "
                         f"{gargs.num_beams} beams; pass --num_beams 1 (greedy decoding, or sampling with --do_sample "
                         "true)")
    if gargs.output_dir:  # a model, a datastore, another command's run, this one's of other inputs: before the model
        claim_output_dir(gargs.output_dir, "generate", inputs, gargs.overwrite, own_files=RESULT_FILES,
                         what="`knnlm generate` run", check_only=True)
    started = time.time()
    lm = load_model(margs)
    plain = generate_continuations(lm, prompts, gargs) if gargs.compare or not (aargs.datastore or aargs.mlp_memory) else None
    model = augment_from_args(lm, aargs, kargs)
    augmented = generate_continuations(lm, prompts, gargs) if model is not None else None
    name = "kNN-LM" if aargs.datastore else "MLP-LM"
    samples = []
    for i, prompt in enumerate(prompts):
        print(f"prompt: {prompt}")
        row = {"prompt": prompt}
        if plain:
            print(f"  LM     : {plain[i]['text']}")
            row["lm"] = plain[i]["text"]
        if augmented:
            print(f"  {name:7s}: {augmented[i]['text']}")
            row["augmented"] = augmented[i]["text"]
        samples.append(row)
    if gargs.output_dir:
        metrics = {"samples": samples, "augmentation": model.knnlm.describe() if model is not None else None,
                   "skipped_prompt_rows": skipped}
        for key, runs in (("lm", plain), ("augmented", augmented)):
            if runs:
                metrics[f"{key}_tokens_per_s"] = sum(r["n_tokens"] for r in runs) / max(sum(r["seconds"] for r in runs), 1e-9)
        claim_output_dir(gargs.output_dir, "generate", inputs, gargs.overwrite, own_files=RESULT_FILES,  # (made only
                         what="`knnlm generate` run", remove_on_replace=True)  # now)
        save_config(gargs.output_dir, margs, aargs, kargs, gargs)
        headers = ["prompt"] + (["LM"] if plain else []) + ([name] if augmented else [])
        rows = [[s["prompt"]] + ([s["lm"]] if plain else []) + ([s["augmented"]] if augmented else []) for s in samples]
        table = markdown_table(headers, [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows])
        finish_outputs(gargs.output_dir, {**to_dict(margs, aargs, kargs, gargs), "prompt": args.prompt}, metrics, table,
                       started)
        print(f"results: {gargs.output_dir}/results.json")
    return 0

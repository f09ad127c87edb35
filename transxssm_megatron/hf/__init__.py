"""Hugging Face export, generation and evaluation of TransXSSM (docs/hf.md).

    configuration_transxssm.py, modeling_transxssm.py   the trust_remote_code model (torch + transformers only)
    names.py        megatron <-> Hugging Face parameter names and configs (the mapping table)
    dist_reader.py  full tensors out of a torch_dist checkpoint, in one process, without a process group
    convert.py      `transxssm convert --to hf|megatron`
    loading.py      an export folder or a megatron checkpoint (converted on the fly) -> model + tokenizer
    generate.py     `transxssm generate` (streams text)
    evaluate.py     `transxssm eval` (lm-eval, paper Table 3 layout); offline_tasks.py writes the offline task YAMLs
    niah.py         `transxssm niah` (needle in a haystack)
    cli.py          add_subcommands(subparsers): registers the four commands on the `transxssm` parser

Nothing here is imported by training; transformers, safetensors, accelerate, lm-eval and matplotlib are the
optional `hf` extra.
"""

"""Run by tests/test_distributed.py under torchrun: one QAT-KD recipe, DDP or FSDP2 over CPU processes."""

import json
import os
import sys

import rqat_sdk


def recipe(strategy: str, compile_student: bool = False) -> dict:
    qat = {"type": "qat_kd", "steps": 4, "batch_size": 8, "micro_batch_size": 2, "learning_rate": 1e-4,
           "logging_steps": 1, "save_steps": 2, "distributed": strategy, "compile_student": compile_student}
    return {
        "version": 1,
        "scheme": "W3G128",
        "stages": [
            {"name": "ptq", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [{"type": "gptq"}]},
            {"name": "qat", "data": {"num_samples": 24, "max_seq_length": 96}, "modifiers": [qat]},
        ],
    }


if __name__ == "__main__":
    model, output, strategy = sys.argv[1:4]
    compile_student = sys.argv[4:5] == ["compile"]
    result = rqat_sdk.oneshot(model, recipe(strategy, compile_student), "reasoning-gym:chain_sum", output)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RECORD " + json.dumps(result.record))

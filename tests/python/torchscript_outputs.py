#!/usr/bin/python3
"""Loads a model.pt with Python's torch (Debian python3-torch) and writes its
forward outputs for a given input, so a C++ test can compare them.

usage: torchscript_outputs.py MODEL_PT INPUT_F32 B F T OUTPUT_F32
"""
import sys

import numpy as np
import torch


def main():
    model_pt, input_path, b, f, t, output_path = sys.argv[1:7]
    module = torch.jit.load(model_pt)
    module.eval()
    x = np.fromfile(input_path, dtype="<f4").reshape(int(b), 1, int(f), int(t))
    with torch.no_grad():
        y = module(torch.from_numpy(x)).numpy().astype("<f4")
    y.tofile(output_path)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""JSONL -> Megatron .bin/.idx for FlexSP (one document per line). See --help.

Example (no download needed):
    python scripts/preprocess_data.py --input data.jsonl --output-prefix out/my \
        --tokenizer-type ByteTokenizer --append-eod --workers 4
    # -> out/my_text_document.bin/.idx; train with --data-path out/my_text_document
"""

import os
import sys

try:
    from megatron.flexsp.data.preprocess import main
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron.flexsp.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())

"""`knnlm lm train` (docs/train.md): a from-scratch GPT-2 on a text file, trained on ``knnlm.train``, saved as an HF
folder; ``OUTPUT_DIR/work`` holds what a rerun resumes from until the finished files are moved into place.

Parts: ``settings`` (LMArgs, LMTrainArgs), ``data`` (tokenizers, token files, block batches, perplexity), ``run``
(the model, the resumable run), ``report`` (the finished folder's results, table and plot).
"""

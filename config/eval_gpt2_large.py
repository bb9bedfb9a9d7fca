# Validation loss of OpenAI's gpt2-large (774M, n_layer=36, n_head=20, n_embd=1280)
# on OpenWebText, as nanoGPT's eval configs:
#   python train.py config/eval_gpt2_large.py
# Nothing is trained or written (eval_only). Add --attention=inattention to see what the same
# weights compute when their keys and values read the initial states, before any fine-tuning.
init_from = 'gpt2-large'
eval_only = True
eval_iters = 500  # many batches: a good estimate of the loss
batch_size = 8
wandb_log = False

# Fine-tune OpenAI's GPT-2 on Tiny Shakespeare (GPT-2 BPE), as nanoGPT's finetune config:
#   python train.py config/finetune_shakespeare.py
# With the attention flag the same command turns GPT-2 into InAttention by fine-tuning:
#   python train.py config/finetune_shakespeare.py --attention=inattention \
#       --out_dir=out-shakespeare-inattn
# gpt2-xl needs a large GPU; --init_from=gpt2 runs on a smaller one.
out_dir = 'out-shakespeare'
dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2
eval_interval = 5
eval_iters = 40
always_save_checkpoint = False  # ckpt.pt keeps the best val loss; a later, worse state: last.pt
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-gpt2'
# 1 sequence x 32 micro-steps x 1024 tokens = 32,768 tokens per step; Shakespeare has ~302K
# tokens, so one epoch is ~9 steps
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20
learning_rate = 3e-5  # constant: a short fine-tune
decay_lr = False

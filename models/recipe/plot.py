"""The loss curves of train-log.json as a PNG (matplotlib)."""


def plot_curves(log, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, m in log['models'].items():
        steps = [c['step'] for c in m['curve']]
        ax.plot(steps, [c['train_loss'] for c in m['curve']], label=f'{name} train', linewidth=1)
        ax.plot(steps, [c['validation_loss'] for c in m['curve']], label=f'{name} validation', linewidth=2)
        ax.axvline(m['best_step'], linestyle=':', linewidth=1)
    ax.set_xlabel('step (32768 tokens each)')
    ax.set_ylabel('cross-entropy (nats per token)')
    ax.set_title('weft default models: State of the Union addresses')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)

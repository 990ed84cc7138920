"""quickstart_pytorch: a Flower ClientApp (Message API).

The train and evaluate handlers are plain Flower: they load the global model from the
``"arrays"`` record, train or test on this node's slice of the digits, and reply with full
weights and metrics. The three fedsqueeze mods in ``ClientApp(mods=...)`` are the only
fedsqueeze code on the client; each one does nothing unless the server's message asks for it.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsqueeze.client import compress_mod, downlink_mod, secagg_mod

from .task import Net, load_data
from .task import test as test_fn
from .task import train as train_fn

# Outermost first: decode a compressed downlink, run SecAgg+, compress the reply.
app = ClientApp(mods=[downlink_mod, secagg_mod, compress_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's data and reply with its weights."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    trainloader, _ = load_data(partition_id, num_partitions)

    config = msg.content["config"]
    train_loss = train_fn(
        model, trainloader, epochs=int(config["local-epochs"]), lr=float(config["lr"])
    )

    metrics = {"num-examples": len(trainloader.dataset), "train-loss": train_loss}
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Test the received model on this node's validation slice."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    _, valloader = load_data(partition_id, num_partitions)

    eval_loss, eval_acc = test_fn(model, valloader)

    metrics = {"num-examples": len(valloader.dataset), "eval-loss": eval_loss, "eval-acc": eval_acc}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

"""Federated learning of plait models on Flower.

Flower (`flwr`, the `plait[fl]` extra) carries the messages, runs the SuperLink/SuperNode
deployment with TLS and node authentication, and provides the standard strategies, SecAgg+ and
the differential-privacy wrappers; plait brings its models, data partitions and what Flower
lacks. One file per job:

command        `plait fl`: arguments, the local run, the deployment files
task           the model of [model] and each client's partition of [data]
partition      IID, Dirichlet(α) label skew and k-labels-per-client splits (digits, text documents)
local          a client's local SGD (FedAvg/FedSGD/FedProx) and the held-out evaluation
records        plait tensors <-> Flower ArrayRecords, upload byte counts
worker         a client's round on a train message (model and partitions built once)
client         the ClientApp (Message API) and its mods
strategies     Flower's strategies (and DP wrappers) built from the [fl] section
guard          the server side of every update: decode, validate, refuse and log, then aggregate
validation     what makes a client update acceptable (keys, shapes, dtypes, finite values)
compress       compressed client updates (top-k / PowerSGD with error feedback)
fedbuff        asynchronous buffered aggregation with a staleness bound
attacks        the attack harness: sign-flip, scaled, NaN/Inf, label flip
privacy        the RDP accountant behind the ε reported each round
secagg         SecAgg+ through Flower's legacy workflow
server         the ServerApp: one run, its history
runner         the in-process runner: Flower's strategies over an in-memory grid with a clock
simulation     the same apps on Flower's own simulation runtime
deploy         SuperLink/SuperNode deployment: app folder, certificates, node keys, commands
app            the module Flower loads in a deployment (`plait.fl.app:server_app`, `:client_app`)
"""

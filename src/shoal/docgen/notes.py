"""What the reference says of fields whose models say nothing themselves.

A field's own `Field(description=...)` always wins: a note here only fills a gap, so
giving the field a description in its model makes its note unused (and it may go). Notes
for fields that no longer exist are never shown. Defaults listed here are those that are
not one fixed value (a path under the home directory of whoever runs the process).
"""

from __future__ import annotations

DESCRIPTIONS = {
    # The job spec (shoal.model, shoal.placing, shoal.services)
    "JobSpec.name": "a name for the job, as listings show it; colocation rules name jobs by it",
    "JobSpec.env": "variables of each task, `{index}` substituted; names starting SHOAL_ are shoal's "
    "and refused",
    "JobSpec.resources": "what each task holds on its node, and is held to (cgroups)",
    "JobSpec.restart": "what happens when a task fails (non-zero exit) or its node is lost",
    "JobSpec.queue": "a queue the master is configured with (`[queues.NAME]`)",
    "JobSpec.preemptible": "may be evicted for higher-priority work, or for a queue below its guarantee",
    "JobSpec.max_per_node": "at most this many tasks of the job on one node",
    "JobSpec.affinities": "soft preferences for nodes matching an expression",
    "JobSpec.spread": "spread the tasks over an attribute's values, with targets in percent",
    "JobSpec.colocation": "where to go relative to other jobs and services: prefer, avoid, or a rule",
    "Resources.cpus": "cpus, fractional; the task gets a CPU quota of as much",
    "Resources.gpus": "whole GPUs; the task sees their indices as CUDA_VISIBLE_DEVICES and SHOAL_GPUS",
    "Affinity.expr": "a constraint expression: `ssd == yes`, `kernel >= 5.10`",
    "Affinity.weight": "score added to matching nodes (negative: taken away)",
    "Spread.attribute": "a node attribute or label: `zone`, `rack`",
    "Spread.targets": "value -> percent of the tasks; values not named share what is left",
    "PortSpec.static": "the same number on every node, held as a resource of the node (unset: a free "
    "port of the node's range)",
    "ServiceSpec.tags": "DNS labels; `TAG.NAME.service.shoal` answers the endpoints tagged so",
    "ServiceSpec.meta": "free-form key -> value, carried with each endpoint",
    "Colocation.weight": "-100..-1 avoid, 1..100 prefer (0 is refused)",
    "Colocation.hard": "a rule, not a preference: never next to them (negative weight), or only "
    "next to them (positive)",
    # The master's settings (shoal.config)
    "MasterSettings.host": "address the API listens on (0.0.0.0: every one)",
    "MasterSettings.port": "port of the API, HTTPS unless insecure",
    "MasterSettings.state_dir": "the store (SQLite: shoal.db), admin.token, blobs/ and tls/",
    "MasterSettings.admin_token": "the admin token, seeded at start (unset: made once, kept in "
    "state_dir/admin.token)",
    "MasterSettings.cluster_token": "the agents' shared token on plain HTTP (unset: made once, kept in "
    "state_dir/cluster.token); a master serving TLS has none",
    "MasterSettings.strategy": "where tasks go when their job names no strategy",
    "MasterSettings.preemption": "whether waiting work may evict preemptible tasks",
    "MasterSettings.queues": "the queues, by name; `default` is always there",
    "MasterSettings.user_weights": "user -> weight in `fair` queues and their DRF (default 1)",
    "QueueSettings.order": "fifo: submission order; priority: highest first, FIFO among equals; fair: "
    "the user with the lowest weighted dominant share first",
    "QueueSettings.weight": "the queue's weight when queues (and frameworks' roles) share the cluster "
    "by weighted DRF",
    # The agent's settings
    "AgentSettings.name": "this node's name (default: the host's name)",
    "AgentSettings.state_dir": "the run table, sandboxes and identity/; other users must be able to "
    "pass through it (not /root)",
    "AgentSettings.labels": 'attributes for constraints, groups and spreads: `rack = "r1"`',
    "AgentSettings.cpus": "cpus to offer (default: all the machine's)",
    "AgentSettings.heartbeat_interval": "seconds between heartbeats to the master",
    # The client file (shoal.clientfile)
    "ClientConfig.token": "the API token calls present (SHOAL_TOKEN)",
}

DEFAULTS = {
    "MasterSettings.state_dir": "`$XDG_DATA_HOME/shoal/master` (`~/.local/share/shoal/master`)",
    "AgentSettings.state_dir": "`$XDG_DATA_HOME/shoal/agent` (`~/.local/share/shoal/agent`)",
}

# Rules between fields, checked when a spec is submitted (the models' validators).
JOBSPEC_RULES = (
    "Unknown keys are refused; every refusal is a 422 naming the field and why.",
    "`command`, `env` and `workdir` may hold no NUL byte; `workdir` is an absolute path.",
    "`constraints` and `affinities[].expr` must parse (`ATTRIBUTE OP VALUE`, see the guide).",
    "`ports[]` names are distinct, and so are static numbers; a port given as a bare string is "
    '`{name = "..."}`.',
    "`services[].port`, and the port of every check (`tcp`, or the first part of `http`), name one "
    "of the job's ports; service names are distinct.",
    "A check gives exactly one of `command`, `tcp` or `http`.",
    '`migrate = "make-before-break"` needs a check: `health`, or a service\'s `check`.',
    "A colocation rule names exactly one of `job` or `service`.",
    "`spread.targets` are percentages, each at least 0, together at most 100.",
    "`resources.custom` names are lowercase letters, digits and `_`, and every one must be "
    "declared by some agent (`--resource`).",
)

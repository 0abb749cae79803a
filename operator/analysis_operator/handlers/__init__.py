"""kopf handlers; importing this package registers them."""

from analysis_operator.handlers import (  # noqa: F401
    admission,
    budgets,
    datasets,
    environments,
    identity,
    indexes,
    lifecycle,
    requests,
)

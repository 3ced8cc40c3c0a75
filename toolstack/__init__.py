"""ferry's toolstack: the libxl of this project.

    cli/         the `ferry` command line
    daemon/      ferryd: the control API and the daemon that serves it
    host/        a host's domains and the jobs that save, restore and move them
    migration/   the protocol between two daemons (sender and receiver)
    policies/    the precopy policies, ferry's own and those users write
    harness/     local daemons and a fault-injecting proxy, for the demo,
                 the bench and the tests

For policy authors, the names to import are here:

    from toolstack import Decision, Policy
"""

from protocol.lazy import lazy_exports

# Loaded when first named: the `ferry` command line imports none of them
__getattr__ = lazy_exports(
    __name__,
    {
        "Decision": ".policies",
        "Estimator": ".policies",
        "Policy": ".policies",
        "PolicyError": ".policies",
        "PrecopyStats": "protocol._gen_helper_msgs",
    },
)

__all__ = ["Decision", "Estimator", "Policy", "PolicyError", "PrecopyStats"]

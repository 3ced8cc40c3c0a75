"""`ferry migrate-resolve`: settle a migration whose outcome is in doubt."""

from __future__ import annotations

from .commands import Command, call


class MigrateResolve(Command):
    name = "migrate-resolve"
    help = "settle a domain left in doubt by a migration (ask the destination again)"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        force = p.add_mutually_exclusive_group()
        force.add_argument(
            "--force-resume",
            action="store_const",
            const="resume",
            dest="force",
            help="you know the guest does not run at the destination: run it here",
        )
        force.add_argument(
            "--force-destroy",
            action="store_const",
            const="destroy",
            dest="force",
            help="you know the guest runs at the destination: destroy this copy",
        )

    @staticmethod
    def run(args) -> int:
        print(call(args, "migrate_resolve", name=args.domain, force=args.force or ""))
        return 0

"""One filesystem request's failure stays that request's.

pyfuse3 answers a request with the errno of a `FUSEError` its handler raises; any other
exception escapes from `pyfuse3.main()` (handlers.pxi catches `FUSEError` only), the request is
never answered and the loop serving the mount ends: one bug met by one `write` would unmount
every object for every user and cut every kernel off.  `guard_requests` wraps each request
handler of an Operations class so that such an exception becomes EIO for that request, with a
line in the mount's `trace` and the traceback in the daemon's log (it is a bug to fix), and the
mount goes on serving.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging

import pyfuse3

log = logging.getLogger("fusepager.fs")


def guard_requests(cls: type) -> type:
    """Class decorator for a `pyfuse3.Operations` subclass with a `trace` attribute (a
    `fusepager.trace.Trace`): every request handler it defines answers EIO for an exception
    that is not a FUSEError."""
    for name in vars(pyfuse3.Operations):
        method = cls.__dict__.get(name)
        if method is not None and inspect.iscoroutinefunction(method):
            setattr(cls, name, _guarded(name, method))
    return cls


def _guarded(name: str, method):
    @functools.wraps(method)
    async def guarded(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as error:
            # Not BaseException: trio's Cancelled (the mount ending) must go through.
            log.exception("mount: internal error in %s (answered EIO)", name)
            self.trace.line(f"mount INTERNAL ERROR in {name}: {error!r} (answered EIO; see the daemon's log)")
            raise pyfuse3.FUSEError(errno.EIO) from None

    guarded.guarded = True  # type: ignore[attr-defined]  # for the tests that check every handler is
    return guarded

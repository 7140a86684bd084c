"""`embedserve neighbors` and `embedserve export`: the index of a running server from the command line.

embedserve neighbors --server HOST:PORT --key CNV/CNV-6294785-1.jpeg -k 10 [--collection C] [--filter EXPR]
embedserve neighbors --server HOST:PORT --image scan.jpeg -k 5
embedserve export --server HOST:PORT --collection C --out C.parquet
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

from service.cli.common import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_tls_flags,
    add_wait_flag,
    connection,
    wait_for_server,
)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the `neighbors` and `export` subcommands to the `embedserve` parser."""
    neighbors = sub.add_parser(
        "neighbors", parents=[common], help="nearest stored items to a stored key or to an image file"
    )
    neighbors.add_argument("--server", required=True, help="HOST:PORT of a running embedserve")
    query = neighbors.add_mutually_exclusive_group(required=True)
    query.add_argument("--key", help="a key stored in the collection")
    query.add_argument("--image", help="an image file, embedded by the server")
    neighbors.add_argument("-k", type=int, default=10, help="how many neighbours (default 10)")
    neighbors.add_argument("--collection", default="", help="collection (default: default)")
    neighbors.add_argument("--filter", default="", help="attribute filter, e.g. 'label == DME and patient != 123'")
    neighbors.add_argument("--include-self", action="store_true", help="with --key, keep the item itself")
    neighbors.add_argument("--token", help="bearer token (or EMBEDSERVE_TOKEN)")
    add_tls_flags(neighbors)
    add_wait_flag(neighbors)
    neighbors.set_defaults(func=cmd_neighbors)

    export = sub.add_parser(
        "export", parents=[common], help="write a stored collection to Parquet (the columns of `embed`)"
    )
    export.add_argument("--server", required=True, help="HOST:PORT of a running embedserve")
    export.add_argument("--collection", default="", help="collection (default: default)")
    export.add_argument("--out", required=True, help="Parquet file to write (replaced atomically)")
    export.add_argument("--token", help="bearer token (or EMBEDSERVE_TOKEN)")
    add_tls_flags(export)
    add_wait_flag(export)
    export.set_defaults(func=cmd_export)


_QUERY_EXIT = {5: EXIT_NOT_FOUND, 3: EXIT_FAILED}
"""Exit code of a failed query by its google.rpc code: NOT_FOUND (an unknown key), INVALID_ARGUMENT (a bad image)."""


def cmd_neighbors(args: argparse.Namespace) -> int:
    from service.client import EmbedClient, NeighborQuery

    if args.k < 1:
        raise UsageError(f"-k {args.k}: ask for at least 1 neighbour")
    if args.image is not None:
        try:
            query = NeighborQuery(image=Path(args.image).read_bytes())
        except OSError as e:
            raise UsageError(f"cannot read {args.image}: {e.strerror or e}") from e
    else:
        query = NeighborQuery(key=args.key)
    with EmbedClient(args.server, **connection(args)) as client:
        wait_for_server(client, args)
        info = client.collection_info(args.collection)
        result = client.neighbors(
            [query],
            k=args.k,
            collection=args.collection,
            filter=args.filter,
            exclude_self=args.key is not None and not args.include_self,
        )[0]
    if result.error is not None:
        print(f"embedserve: error: {result.error.reason}: {result.error.message}", file=sys.stderr)
        return _QUERY_EXIT.get(result.error.code, EXIT_USAGE)
    what = f"key {args.key}" if args.key is not None else f"image {args.image}"
    direction = "higher is closer" if info.metric == "cosine" else "squared distance, lower is closer"
    print(
        f"{len(result.neighbors)} neighbours of {what} in {info.name} ({info.count} items, {info.metric}: {direction})",
        file=sys.stderr,
    )
    width = max([len("key"), *(len(n.key) for n in result.neighbors)])
    print(f"{'rank':>4}  {'score':>9}  {'key':<{width}}  {'label':<8}  attributes")
    for rank, n in enumerate(result.neighbors, 1):
        others = " ".join(f"{k}={v}" for k, v in sorted(n.attributes.items()) if k not in ("label", "path"))
        print(f"{rank:>4}  {n.score:>9.4f}  {n.key:<{width}}  {n.attributes.get('label', '-'):<8}  {others}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from service.client import EmbedClient
    from service.jobs.embed_dir import schema_for, write_parquet_atomic

    out = Path(args.out)
    if out.suffix.lower() != ".parquet":
        raise UsageError(f"--out {out} should end in .parquet")
    with EmbedClient(args.server, **connection(args)) as client:
        wait_for_server(client, args)
        info = client.collection_info(args.collection)
        model = dataclasses.replace(client.model_info(), embedding_dim=info.dim)
        schema = schema_for(model)
        keys: list[str] = []
        paths: list[str] = []
        labels: list[str | None] = []
        vectors: list[np.ndarray] = []
        for page in client.iter_items(collection=args.collection, include_vectors=True):
            keys.extend(page.keys)
            paths.extend(a.get("path", "") for a in page.attributes)
            labels.extend(a.get("label") for a in page.attributes)
            vectors.append(page.vectors)
    flat = np.concatenate(vectors).astype(np.float32, copy=False).ravel() if keys else np.zeros(0, np.float32)
    table = pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()),
            pa.array(paths, pa.string()),
            pa.array(labels, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), info.dim),
        ],
        schema=schema,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(table, out)
    print(f"{len(keys)} items of collection {info.name} ({info.dim}-d) written to {out}", file=sys.stderr)
    return EXIT_OK

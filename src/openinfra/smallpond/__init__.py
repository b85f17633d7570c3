"""Runtime layer: smallpond, DuckDB-based distributed data processing on local disk or 3FS.

Same API as DeepSeek's smallpond, so its examples run after changing the import::

    from openinfra import smallpond

    sp = smallpond.init()
    df = sp.read_parquet("prices.parquet")
    df = df.repartition(3, hash_by="ticker")
    df = sp.partial_sql("SELECT ticker, min(price), max(price) FROM {0} GROUP BY ticker", df)
    df.write_parquet("output/")
    print(df.to_pandas())

Each operation adds a node to a lazy logical plan; an action optimizes it (chains of SQL nodes fuse
into one query), plans one task per partition and runs them on a local fork-per-task pool (or Ray),
each task in its own DuckDB. Tasks commit their output by renaming a directory, so a re-run with
the same ``job_id`` skips finished tasks; failed tasks retry.
"""

from openinfra.smallpond.dataframe import DataFrame
from openinfra.smallpond.dataset import (
    ArrowTableDataSet, CsvDataSet, DataSet, JsonDataSet, PandasDataSet, ParquetDataSet,
)
from openinfra.smallpond.driver import Driver
from openinfra.smallpond.executor import JobStats
from openinfra.smallpond.node import (
    ArrowBatchNode, ArrowComputeNode, ArrowStreamNode, ConsolidateNode, Context, DataSetPartitionNode, DataSinkNode,
    DataSourceNode, EvenlyDistributedPartitionNode, HashPartitionNode, LimitNode, LogicalPlan, Node, PandasBatchNode,
    PandasComputeNode, PartitionNode, ProjectionNode, PythonScriptNode, RootNode, ShuffleNode, SqlEngineNode, UnionNode,
)
from openinfra.smallpond.optimizer import Optimizer, optimize
from openinfra.smallpond.partition import (
    LoadPartitionedDataSetNode, RangePartitionNode, RepeatPartitionNode, UserDefinedPartitionNode,
)
from openinfra.smallpond.session import Session, SessionConfig, init
from openinfra.smallpond.task import InjectedFault, RuntimeContext, SqlError, TaskFailed
from openinfra.smallpond.udf import (
    UDFAnyParameters, UDFListType, UDFMapType, UDFStructType, UDFType, UserDefinedFunction, udf,
)

__all__ = [
    "init", "Session", "SessionConfig", "DataFrame", "Driver", "JobStats",
    "DataSet", "ParquetDataSet", "CsvDataSet", "JsonDataSet", "ArrowTableDataSet", "PandasDataSet",
    "Context", "Node", "DataSourceNode", "DataSetPartitionNode", "EvenlyDistributedPartitionNode", "HashPartitionNode",
    "ShuffleNode", "SqlEngineNode", "ArrowComputeNode", "ArrowStreamNode", "ArrowBatchNode", "PandasComputeNode",
    "PandasBatchNode", "PythonScriptNode", "ProjectionNode", "LimitNode", "UnionNode", "ConsolidateNode", "RootNode",
    "PartitionNode", "DataSinkNode", "LogicalPlan", "Optimizer", "optimize",
    "RangePartitionNode", "UserDefinedPartitionNode", "LoadPartitionedDataSetNode", "RepeatPartitionNode",
    "udf", "UDFType", "UDFStructType", "UDFListType", "UDFMapType", "UDFAnyParameters", "UserDefinedFunction",
    "RuntimeContext", "SqlError", "TaskFailed", "InjectedFault",
]

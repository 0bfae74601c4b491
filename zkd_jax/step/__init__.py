"""The jitted programs of training: the train state, the step of 1 or K students, evaluation, scans.

Knows no files and no config: every function takes the values it needs.
"""

from zkd_jax.step.eval import EvalStep, make_eval_step
from zkd_jax.step.multi import (
    FORMS,
    StateStack,
    abstract_states,
    create_states,
    make_multi_train_step,
)
from zkd_jax.step.state import (
    TrainState,
    abstract_train_state,
    abstract_variables,
    create_train_state,
    init_variables,
    make_initializer,
    student_variables,
)
from zkd_jax.step.train_step import (
    TeacherCall,
    TrainStep,
    jit_train_step,
    make_student_update,
    make_train_step,
)

__all__ = [
    "EvalStep", "FORMS", "StateStack", "TeacherCall", "TrainState", "TrainStep",
    "abstract_states", "abstract_train_state", "abstract_variables", "create_states",
    "create_train_state", "init_variables", "jit_train_step", "make_eval_step",
    "make_initializer", "make_multi_train_step", "make_student_update", "make_train_step",
    "student_variables",
]

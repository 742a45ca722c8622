//! Named access to a model's parameters: collection for checkpoints and
//! gradients, and replacement for loading and optimizer updates.

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Gradients, Tensor};

/// Tracks the dotted path of the parameter being visited, for example
/// `blocks.0.moe.experts.3.w_gate`.
#[derive(Default)]
pub(crate) struct PathStack {
    parts: Vec<String>,
}

impl PathStack {
    pub(crate) fn enter(&mut self, name: &str) {
        self.parts.push(name.to_string());
    }

    pub(crate) fn exit(&mut self) {
        self.parts.pop();
    }

    pub(crate) fn current(&self) -> String {
        self.parts.join(".")
    }
}

/// One parameter's name, shape and value.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Tensor<1>,
}

/// Collects every float parameter, flattened, in visiting order.
#[derive(Default)]
pub struct ParamCollector {
    path: PathStack,
    pub params: Vec<NamedTensor>,
}

impl ModuleVisitor for ParamCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val().inner();
        let shape = value.dims().to_vec();
        let numel: usize = shape.iter().product();
        self.params.push(NamedTensor { name: self.path.current(), shape, value: value.reshape([numel]) });
    }
}

/// Collects the gradient of every parameter that has one, flattened.
pub struct GradientCollector<'a> {
    path: PathStack,
    grads: &'a Gradients,
    pub gradients: Vec<(String, ParamId, Tensor<1>)>,
}

impl<'a> GradientCollector<'a> {
    pub fn new(grads: &'a Gradients) -> Self {
        Self { path: PathStack::default(), grads, gradients: Vec::new() }
    }
}

impl ModuleVisitor for GradientCollector<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = param.val().grad(self.grads) {
            let numel: usize = grad.dims().iter().product();
            self.gradients.push((self.path.current(), param.id, grad.reshape([numel])));
        }
    }
}

/// Replaces parameter values by name: `update(name, shape, current_flat) -> new_flat`.
/// A parameter for which `update` returns `None` keeps its value.
pub struct ParamUpdater<F> {
    path: PathStack,
    update: F,
}

impl<F> ParamUpdater<F>
where
    F: FnMut(&str, &[usize], Tensor<1>) -> Option<Tensor<1>>,
{
    pub fn new(update: F) -> Self {
        Self { path: PathStack::default(), update }
    }
}

impl<F> ModuleMapper for ParamUpdater<F>
where
    F: FnMut(&str, &[usize], Tensor<1>) -> Option<Tensor<1>>,
{
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let require_grad = tensor.is_require_grad();
        let numel: usize = dims.iter().product();
        let flat = tensor.clone().inner().reshape([numel]);
        let updated = match (self.update)(&self.path.current(), &dims, flat) {
            Some(new_flat) => {
                let value = Tensor::from_inner(new_flat.reshape(dims));
                if require_grad { value.require_grad() } else { value }
            }
            None => tensor,
        };
        Param::from_mapped_value(id, updated, mapper)
    }
}
